//! Device state for snapshots and migration. Each device saves what the guest can observe
//! (registers, configuration space, queue addresses) as a typed [`Persist::State`]; restoring
//! it into a device built the same way (same command line) reproduces what the guest saw.
//! States are checked: one that does not fit the device is refused with [`StateError`] and
//! the device keeps its current state.
//!
//! The shape is Firecracker's `snapshot::Persist`, restoring in place: the VMM builds the
//! devices from the configuration first, then restores each one.

use serde::{Deserialize, Serialize};

/// Why a device state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The saved state does not fit this device.
    #[error("{0}: saved state does not fit: {1}")]
    Mismatch(String, String),
    /// The device (or its process) could not do it.
    #[error("{0}: {1}")]
    Device(String, String),
}

/// A device whose guest-visible state can be saved and restored in place.
pub trait Persist {
    /// What the device saves: plain, serialisable data.
    type State;

    /// Saves the device's state.
    ///
    /// # Errors
    /// [`StateError::Device`] when the device (or its process) cannot report it.
    fn save(&mut self) -> Result<Self::State, StateError>;

    /// Restores `state` into this device, built the same way as the one that saved it.
    ///
    /// # Errors
    /// [`StateError`]; the device then keeps its state.
    fn restore(&mut self, state: &Self::State) -> Result<(), StateError>;
}

/// A PCI function's saved state, by kind (in the machine state as `{"kind": state}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FunctionState {
    /// The host bridge: its configuration space (64 dwords).
    HostBridge(Vec<u32>),
    /// A virtio device's PCI transport ([`crate::virtio::pci::VirtioPciDevice`]).
    Virtio(Box<crate::virtio::pci::TransportState>),
    /// A passthrough device's emulated PCI function ([`crate::passthrough::pci::PassthroughPci`]).
    Passthrough(crate::passthrough::pci::PassthroughState),
}

impl FunctionState {
    /// The kind's name, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            FunctionState::HostBridge(_) => "host bridge",
            FunctionState::Virtio(_) => "virtio",
            FunctionState::Passthrough(_) => "passthrough",
        }
    }
}

/// The error for a saved function of another kind than `who`.
pub fn other_kind(who: &str, expected: &str, got: &FunctionState) -> StateError {
    StateError::Mismatch(
        who.to_string(),
        format!(
            "saved as a {} function, this is a {expected} one",
            got.kind()
        ),
    )
}
