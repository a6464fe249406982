//! MSI-X (PCI 3.0 section 6.8.2): the capability, the vector table and the pending-bit array,
//! with each vector backed by an [`MsiVector`].

use std::sync::Arc;

use crate::interrupt::MsiVector;

/// Capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
const ENTRY_SIZE: u64 = 16;
const CTRL_MASKED: u32 = 1;
const MSG_CTRL_ENABLE: u16 = 1 << 15;
const MSG_CTRL_FUNCTION_MASK: u16 = 1 << 14;

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

/// What [`Msix::save`] returns: every entry `(addr_lo, addr_hi, data, ctrl)`, the pending
/// bits and the two control bits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// Table entries.
    pub entries: Vec<(u32, u32, u32, u32)>,
    /// Pending bit array.
    pub pending: Vec<u64>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_mask: bool,
}

/// MSI-X state of a function.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    vectors: Vec<Arc<dyn MsiVector>>,
    enabled: bool,
    function_mask: bool,
}

impl Msix {
    /// A table backed by `vectors` (one entry each), every entry masked.
    pub fn new(vectors: Vec<Arc<dyn MsiVector>>) -> Self {
        let n = vectors.len();
        Self {
            entries: vec![
                Entry {
                    ctrl: CTRL_MASKED,
                    ..Default::default()
                };
                n
            ],
            pending: vec![0; n.div_ceil(64)],
            vectors,
            enabled: false,
            function_mask: false,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The eventfd that raises vector `i` when written, if it has one (see
    /// [`MsiVector::irqfd`]).
    pub fn irqfd(&self, i: usize) -> Option<std::os::fd::RawFd> {
        self.vectors.get(i)?.irqfd()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The capability body for a table at `table_offset` and PBA at `pba_offset` of BAR
    /// `bar`, and its writable mask.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let mut c = vec![MSIX_CAP_ID, 0];
        c.extend_from_slice(&((self.len() as u16).saturating_sub(1)).to_le_bytes());
        c.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        c.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut w = vec![0u8; c.len()];
        w[3] = 0xc0; // enable and function mask
        (c, w)
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The guest wrote the capability's message control.
    pub fn set_message_control(&mut self, ctrl: u16) {
        let was_masked = !self.enabled || self.function_mask;
        self.enabled = ctrl & MSG_CTRL_ENABLE != 0;
        self.function_mask = ctrl & MSG_CTRL_FUNCTION_MASK != 0;
        for i in 0..self.entries.len() {
            self.update_route(i);
        }
        if was_masked && self.enabled && !self.function_mask {
            for i in 0..self.entries.len() {
                self.deliver_pending(i);
            }
        }
    }

    fn masked(&self, i: usize) -> bool {
        !self.enabled || self.function_mask || self.entries[i].ctrl & CTRL_MASKED != 0
    }

    fn update_route(&self, i: usize) {
        let e = self.entries[i];
        let addr = u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32);
        if let Err(err) = self.vectors[i].update(addr, e.data, !self.masked(i)) {
            log::warn!("MSI-X: cannot route vector {i}: {err}");
        }
    }

    fn deliver_pending(&mut self, i: usize) {
        let (w, b) = (i / 64, i % 64);
        if self.pending[w] & (1 << b) != 0 && !self.masked(i) {
            self.pending[w] &= !(1 << b);
            self.vectors[i].trigger();
        }
    }

    /// The table and control state.
    pub fn save(&self) -> MsixState {
        MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| (e.addr_lo, e.addr_hi, e.data, e.ctrl))
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_mask: self.function_mask,
        }
    }

    /// Restores a saved table and re-programs every vector's route.
    ///
    /// # Errors
    /// A message when the number of vectors differs.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), String> {
        self.check(s)?;
        for (e, &(addr_lo, addr_hi, data, ctrl)) in self.entries.iter_mut().zip(&s.entries) {
            *e = Entry {
                addr_lo,
                addr_hi,
                data,
                ctrl,
            };
        }
        self.pending.clone_from(&s.pending);
        self.enabled = s.enabled;
        self.function_mask = s.function_mask;
        for i in 0..self.entries.len() {
            self.update_route(i);
        }
        Ok(())
    }

    /// Whether [`Msix::restore`] would take `s`, changing nothing.
    ///
    /// # Errors
    /// A vector count or pending array of another size.
    pub fn check(&self, s: &MsixState) -> Result<(), String> {
        if s.entries.len() != self.entries.len() || s.pending.len() != self.pending.len() {
            return Err(format!(
                "{} MSI-X vectors saved, this function has {}",
                s.entries.len(),
                self.entries.len()
            ));
        }
        Ok(())
    }

    /// Raises vector `i`: delivered, or left pending while masked.
    pub fn trigger(&mut self, i: usize) {
        if i >= self.entries.len() {
            return;
        }
        if self.masked(i) {
            self.pending[i / 64] |= 1 << (i % 64);
        } else {
            self.vectors[i].trigger();
        }
    }

    /// Guest read of the vector table at `offset`.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let v = self.read_dword(offset & !3);
        let shift = 8 * (offset % 4);
        let v = if data.len() == 8 {
            u64::from(v) | (u64::from(self.read_dword((offset & !3) + 4)) << 32)
        } else {
            u64::from(v >> shift)
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (8 * i)) as u8;
        }
    }

    fn read_dword(&self, offset: u64) -> u32 {
        let i = (offset / ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get(i) else {
            return 0;
        };
        match offset % ENTRY_SIZE {
            0 => e.addr_lo,
            4 => e.addr_hi,
            8 => e.data,
            _ => e.ctrl,
        }
    }

    /// Guest write of the vector table at `offset` (4 or 8 bytes).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        if !offset.is_multiple_of(4) || (data.len() != 4 && data.len() != 8) {
            return;
        }
        for (k, chunk) in data.chunks(4).enumerate() {
            let off = offset + 4 * k as u64;
            let i = (off / ENTRY_SIZE) as usize;
            let Some(e) = self.entries.get_mut(i) else {
                return;
            };
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            match off % ENTRY_SIZE {
                0 => e.addr_lo = v,
                4 => e.addr_hi = v,
                8 => e.data = v,
                _ => e.ctrl = v & CTRL_MASKED,
            }
            self.update_route(i);
            self.deliver_pending(i);
        }
    }

    /// Guest read of the pending-bit array.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            let byte = offset + k as u64;
            let w = (byte / 8) as usize;
            *b = self
                .pending
                .get(w)
                .map(|v| (v >> (8 * (byte % 8))) as u8)
                .unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::interrupt::testing::RecordingInterrupts;
    use crate::interrupt::InterruptManager;

    #[test]
    fn masked_vectors_stay_pending() {
        let mgr = RecordingInterrupts::default();
        let mut m = Msix::new(mgr.allocate_msi(2).unwrap());
        m.trigger(1);
        m.trigger(7);
        let v = mgr.vectors.lock().unwrap()[1].clone();
        assert_eq!(v.fired.load(Ordering::SeqCst), 0);
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.set_message_control(MSG_CTRL_ENABLE);
        m.table_write(16, &0xfee0_0000u32.to_le_bytes());
        m.table_write(24, &0x4041u32.to_le_bytes());
        assert_eq!(v.fired.load(Ordering::SeqCst), 0, "still masked per vector");
        m.table_write(28, &0u32.to_le_bytes());
        assert_eq!(
            v.fired.load(Ordering::SeqCst),
            1,
            "pending delivered on unmask"
        );
        assert_eq!(*v.route.lock().unwrap(), Some((0xfee0_0000, 0x4041, true)));
        m.trigger(1);
        assert_eq!(v.fired.load(Ordering::SeqCst), 2);
        let mut d = [0u8; 4];
        m.table_read(24, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4041);
        m.table_write(1 << 20, &[1, 2, 3, 4]);
        m.table_read(1 << 20, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
