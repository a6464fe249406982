//! Device state for snapshots and migration. Each device saves what the guest can observe
//! (registers, configuration space, queue addresses) as a JSON value; restoring it into a
//! device built the same way (same command line) reproduces what the guest saw. Values are
//! checked: a state that does not fit the device is refused with [`StateError`] and the
//! device keeps its current state.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

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

/// Serializes `v` (infallible for the plain structures used here).
pub fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Deserializes `v` as `T`, naming `who` in the error.
///
/// # Errors
/// [`StateError::Mismatch`].
pub fn from_value<T: DeserializeOwned>(who: &str, v: &Value) -> Result<T, StateError> {
    T::deserialize(v).map_err(|e| StateError::Mismatch(who.to_string(), e.to_string()))
}
