//! Legacy port-I/O devices: the 16550 UART, the i8042 reset line, the ACPI hardware-reduced
//! sleep/reset registers and the test-exit port.

mod power;
mod serial;

pub use power::{AcpiPowerButton, I8042Reset, TestExit};
pub use serial::{Serial, SerialOutput, SerialSaved};
