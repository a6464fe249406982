//! Request processing of virtio-blk.

use std::os::unix::fs::FileExt;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{BlockMemory, VirtioBlock, SECTOR_SIZE};
use crate::virtio::{write_bufs, Buf, Chain};

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Bytes moved per step, bounding the VMM's buffer whatever the descriptors say.
const CHUNK: usize = 1 << 20;

enum Failure {
    /// The guest memory access was refused or out of bounds.
    Memory,
    /// Bad request or disk error.
    Io,
}

/// Reads `len` bytes at byte `offset` of the concatenation of `bufs`.
fn read_bufs<M: GuestMemory + ?Sized>(
    mem: &M,
    bufs: &[Buf],
    offset: u64,
    out: &mut [u8],
) -> Result<(), Failure> {
    let mut pos = 0u64;
    let mut done = 0usize;
    let end = offset + out.len() as u64;
    for &(addr, len) in bufs {
        let buf_end = pos + u64::from(len);
        if buf_end > offset && pos < end {
            let from = offset.max(pos);
            let n = (end.min(buf_end) - from) as usize;
            let gpa = addr.checked_add(from - pos).ok_or(Failure::Memory)?;
            mem.read_slice(&mut out[done..done + n], GuestAddress(gpa))
                .map_err(|_| Failure::Memory)?;
            done += n;
        }
        pos = buf_end;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(Failure::Memory)
    }
}

impl VirtioBlock {
    /// Completes every available request, then signals the guest once.
    pub fn process_queue(&mut self) {
        let mem = self.mem.clone();
        let used = match &mem {
            BlockMemory::Plain(m) => self.process_with(m.as_ref()),
            BlockMemory::Iova(m) => self.process_with(m),
        };
        if used {
            if let Some(i) = &self.interrupt {
                i.signal_queue(0);
            }
        }
    }

    fn process_with<M: GuestMemory>(&mut self, mem: &M) -> bool {
        let Some(mut queue) = self.queues.pop() else {
            return false;
        };
        let mut any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let c = Chain::from_desc_chain(chain);
            let used = self.handle(mem, &c);
            if queue.add_used(mem, c.head, used).is_err() {
                // The used ring itself is not reachable: nothing more can be answered.
                self.counters.translation_faults += 1;
                break;
            }
            any = true;
        }
        let notify = any && queue.needs_notification(mem).unwrap_or(true);
        self.queues.push(queue);
        notify
    }

    /// Handles one request; returns the used length.
    fn handle<M: GuestMemory>(&mut self, mem: &M, c: &Chain) -> u32 {
        let writable = c.writable_len();
        // The status byte is the last writable byte.
        let Some(status_off) = writable.checked_sub(1) else {
            self.counters.io_errors += 1;
            return 0;
        };
        let mut header = [0u8; 16];
        let (status, data_len) = match read_bufs(mem, &c.readable, 0, &mut header) {
            Err(f) => (self.fail(f), 0),
            Ok(()) => {
                let type_ = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
                match self.execute(mem, c, type_, sector, status_off) {
                    Ok(n) => (VIRTIO_BLK_S_OK, n),
                    Err(Some(f)) => (self.fail(f), 0),
                    Err(None) => {
                        self.counters.unsupported += 1;
                        (VIRTIO_BLK_S_UNSUPP, 0)
                    }
                }
            }
        };
        if write_bufs(mem, &c.writable, status_off, &[status]).is_err() {
            self.counters.translation_faults += 1;
            return 0;
        }
        u32::try_from(data_len + 1).unwrap_or(u32::MAX)
    }

    fn fail(&mut self, f: Failure) -> u8 {
        self.counters.io_errors += 1;
        if let Failure::Memory = f {
            self.counters.translation_faults += 1;
        }
        VIRTIO_BLK_S_IOERR
    }

    /// Runs a request; returns bytes written into the guest's data buffers. `Err(None)` for
    /// an unknown type.
    fn execute<M: GuestMemory>(
        &mut self,
        mem: &M,
        c: &Chain,
        type_: u32,
        sector: u64,
        data_len: u64,
    ) -> Result<u64, Option<Failure>> {
        let disk_bytes = self.sectors * SECTOR_SIZE;
        let start = sector.checked_mul(SECTOR_SIZE).ok_or(Some(Failure::Io))?;
        match type_ {
            VIRTIO_BLK_T_IN => {
                let end = start.checked_add(data_len).ok_or(Some(Failure::Io))?;
                if end > disk_bytes {
                    return Err(Some(Failure::Io));
                }
                let mut buf = vec![0u8; CHUNK.min(data_len as usize)];
                let mut off = 0u64;
                while off < data_len {
                    let n = (data_len - off).min(CHUNK as u64) as usize;
                    self.disk
                        .read_exact_at(&mut buf[..n], start + off)
                        .map_err(|_| Some(Failure::Io))?;
                    write_bufs(mem, &c.writable, off, &buf[..n])
                        .map_err(|_| Some(Failure::Memory))?;
                    off += n as u64;
                }
                self.counters.reads += 1;
                self.counters.bytes_read += data_len;
                Ok(data_len)
            }
            VIRTIO_BLK_T_OUT => {
                let len = c.readable_len().saturating_sub(16);
                let end = start.checked_add(len).ok_or(Some(Failure::Io))?;
                if self.read_only || end > disk_bytes {
                    return Err(Some(Failure::Io));
                }
                let mut buf = vec![0u8; CHUNK.min(len as usize)];
                let mut off = 0u64;
                while off < len {
                    let n = (len - off).min(CHUNK as u64) as usize;
                    read_bufs(mem, &c.readable, 16 + off, &mut buf[..n]).map_err(Some)?;
                    self.disk
                        .write_all_at(&buf[..n], start + off)
                        .map_err(|_| Some(Failure::Io))?;
                    off += n as u64;
                }
                self.counters.writes += 1;
                self.counters.bytes_written += len;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.disk.sync_data().map_err(|_| Some(Failure::Io))?;
                }
                self.counters.flushes += 1;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; 20];
                let b = self.id.as_bytes();
                id[..b.len().min(20)].copy_from_slice(&b[..b.len().min(20)]);
                let n = data_len.min(20) as usize;
                write_bufs(mem, &c.writable, 0, &id[..n]).map_err(|_| Some(Failure::Memory))?;
                Ok(n as u64)
            }
            _ => Err(None),
        }
    }
}
