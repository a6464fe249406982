//! A 16550A UART on `vm-superio`, its interrupt delivered through an eventfd (a KVM irqfd).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// An eventfd that raises the UART's IRQ when written.
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(File),
    /// Discarded.
    Sink,
}

impl SerialOutput {
    /// Opens `path` for the console, truncating it.
    ///
    /// # Errors
    /// When the file cannot be created.
    pub fn file(path: &Path) -> io::Result<Self> {
        Ok(SerialOutput::File(File::create(path)?))
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::Stdout => io::stdout().write(buf),
            SerialOutput::File(f) => f.write(buf),
            SerialOutput::Sink => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOutput::Stdout => io::stdout().flush(),
            SerialOutput::File(f) => f.flush(),
            SerialOutput::Sink => Ok(()),
        }
    }
}

/// Saved UART registers (DLL, DLH, IER, IIR, LCR, LSR, MCR, MSR, SCR) and receive FIFO.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SerialSaved {
    regs: [u8; 9],
    in_buffer: Vec<u8>,
}

/// The UART as a bus device (8 registers).
pub struct Serial {
    inner: vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOutput>,
    output_error_logged: bool,
}

impl Serial {
    /// A UART writing to `out` and raising its interrupt through `irq`.
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        Self {
            inner: vm_superio::Serial::new(IrqTrigger(irq), out),
            output_error_logged: false,
        }
    }

    /// Queues bytes of console input for the guest.
    ///
    /// # Errors
    /// When the receive FIFO is full or the interrupt cannot be raised.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.inner
            .enqueue_raw_bytes(bytes)
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }
}

impl crate::state::Persist for Serial {
    type State = SerialSaved;

    /// The UART's registers and receive FIFO, for a snapshot.
    fn save(&mut self) -> Result<SerialSaved, crate::state::StateError> {
        let st = self.inner.state();
        Ok(SerialSaved {
            regs: [
                st.baud_divisor_low,
                st.baud_divisor_high,
                st.interrupt_enable,
                st.interrupt_identification,
                st.line_control,
                st.line_status,
                st.modem_control,
                st.modem_status,
                st.scratch,
            ],
            in_buffer: st.in_buffer,
        })
    }

    /// Restores the saved registers and FIFO (the output and interrupt stay this UART's).
    fn restore(&mut self, saved: &SerialSaved) -> Result<(), crate::state::StateError> {
        if saved.in_buffer.len() > self.inner.fifo_capacity() + self.inner.state().in_buffer.len()
            || saved.in_buffer.len() > 64
        {
            return Err(crate::state::StateError::Mismatch(
                "serial port".into(),
                "receive FIFO overflows".into(),
            ));
        }
        let [dll, dlh, ier, iir, lcr, lsr, mcr, msr, scr] = saved.regs;
        let st = vm_superio::serial::SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlh,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: saved.in_buffer.clone(),
        };
        let err = |e: String| crate::state::StateError::Device("serial port".into(), e);
        let irq = self
            .inner
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| err(e.to_string()))?;
        let out = std::mem::replace(self.inner.writer_mut(), SerialOutput::Sink);
        match vm_superio::Serial::from_state(
            &st,
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        ) {
            Ok(inner) => {
                self.inner = inner;
                Ok(())
            }
            Err(e) => Err(crate::state::StateError::Mismatch(
                "serial port".into(),
                format!("{e:?}"),
            )),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.inner.write(off, value) {
                if !self.output_error_logged {
                    log::warn!("serial: {e:?}");
                    self.output_error_logged = true;
                }
            }
        }
    }
}
