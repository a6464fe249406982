//! Ways for the guest to end the VM: i8042 reset, the ACPI hardware-reduced sleep control and
//! reset registers (FADT `SLEEP_CONTROL_REG`, `RESET_REG`), and a test-exit port.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitReason, VmExit};

/// Ends the VM with [`ExitReason::Reset`] when triggered.
pub struct ResetTrigger(Arc<VmExit>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 keyboard controller as far as `reboot=k` needs it, from `vm-superio`: reads are
/// 0 ("input buffer empty"), and command `0xfe` on port 0x64 (offset 4) pulses the reset line.
pub struct I8042Reset {
    inner: vm_superio::I8042Device<ResetTrigger>,
}

impl I8042Reset {
    /// Command that resets the CPU.
    pub const CMD_RESET: u8 = 0xfe;

    /// A controller that ends the VM with [`ExitReason::Reset`].
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self {
            inner: vm_superio::I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042Reset {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = self.inner.read(u8::try_from(offset).unwrap_or(u8::MAX));
        data.fill(v);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&v)) = (u8::try_from(offset), data.first()) {
            let Ok(()) = self.inner.write(offset, v);
        }
    }
}

/// ACPI hardware-reduced sleep status (offset 0), sleep control (offset 1) and reset
/// (offset 2) registers, each one byte (ACPI 6.5 section 4.8.3.7 and 4.8.3.6).
pub struct AcpiPowerButton {
    exit: Arc<VmExit>,
}

impl AcpiPowerButton {
    /// `SLP_EN` bit of the sleep control register.
    pub const SLP_EN: u8 = 1 << 5;
    /// `SLP_TYP` the DSDT's `_S5` object gives for soft-off.
    pub const SLP_TYP_S5: u8 = 5;
    /// Value written to the reset register to reset.
    pub const RESET_VALUE: u8 = 1;

    /// Registers that end the VM.
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPowerButton {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            1 if v & Self::SLP_EN != 0 && (v >> 2) & 0x7 == Self::SLP_TYP_S5 => {
                self.exit.request(ExitReason::PowerOff)
            }
            2 if v == Self::RESET_VALUE => self.exit.request(ExitReason::Reset),
            _ => {}
        }
    }
}

/// A 4-byte port: a 32-bit write of `code` ends the VM with exit status `code` (the guest
/// test suites report their result this way, as QEMU's `isa-debug-exit` does).
pub struct TestExit {
    exit: Arc<VmExit>,
}

impl TestExit {
    /// A port that ends the VM with [`ExitReason::TestExit`].
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for TestExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let code = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.exit.request(ExitReason::TestExit(code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_can_end_the_vm() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut k = I8042Reset::new(exit.clone());
        k.write(0x60, 0, &[0xfe]);
        assert_eq!(exit.reason(), None);
        k.write(0x60, 4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));

        let exit = Arc::new(VmExit::new().unwrap());
        let mut p = AcpiPowerButton::new(exit.clone());
        p.write(0x600, 1, &[5 << 2]);
        assert_eq!(exit.reason(), None);
        p.write(0x600, 1, &[(5 << 2) | (1 << 5)]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));

        let exit = Arc::new(VmExit::new().unwrap());
        TestExit::new(exit.clone()).write(0x604, 0, &7u32.to_le_bytes());
        assert_eq!(exit.reason(), Some(ExitReason::TestExit(7)));
        assert_eq!(exit.reason().unwrap().exit_code(), 7);
    }
}
