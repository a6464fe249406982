//! Request processing of virtio-blk: each chain is read through `virtio-queue`'s `Reader`
//! (header, then the data of a write) and written through its `Writer` (the data of a read,
//! then the status byte at the end of the writable part).

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestMemory};

use super::{BlockMemory, VirtioBlock, SECTOR_SIZE};

/// Bytes moved per step, bounding the VMM's buffer whatever the descriptors say.
const CHUNK: usize = 1 << 20;
/// `struct virtio_blk_outhdr`: type, reserved, sector.
const HEADER: usize = 16;
/// `VIRTIO_BLK_ID_BYTES`.
const ID_BYTES: usize = 20;

enum Failure {
    /// The guest memory access was refused or out of bounds.
    Memory,
    /// Bad request or disk error.
    Io,
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

    fn process_with<M: GuestMemory<Bitmap = AtomicBitmap>>(&mut self, mem: &M) -> bool {
        let Some(mut queue) = self.queues.pop() else {
            return false;
        };
        let mut any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used = self.handle(mem, chain);
            if queue.add_used(mem, head, used).is_err() {
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

    /// Handles one request; returns the used length (data bytes written, and the status).
    fn handle<M: GuestMemory<Bitmap = AtomicBitmap>>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> u32 {
        // The status byte is the last writable byte.
        let Some(status_at) = chain
            .clone()
            .writable()
            .last()
            .filter(|d| d.len() > 0)
            .and_then(|d| d.addr().0.checked_add(u64::from(d.len()) - 1))
        else {
            self.counters.io_errors += 1;
            return 0;
        };
        let reader = Reader::new(mem, chain.clone());
        let writer = Writer::new(mem, chain);
        let (status, data_len, status_writer) = match (reader, writer) {
            (Ok(mut r), Ok(mut w)) => {
                let data_len = w.available_bytes().saturating_sub(1);
                let status_w = w.split_at(data_len).ok();
                let mut header = [0u8; HEADER];
                let (status, n) = match r.read_exact(&mut header) {
                    Err(_) => (self.fail(Failure::Memory), 0),
                    Ok(()) => {
                        let type_ =
                            u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                        let sector =
                            u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
                        let out_len = r.available_bytes() as u64;
                        match self.execute(
                            &mut r,
                            &mut w,
                            type_,
                            sector,
                            (data_len as u64, out_len),
                        ) {
                            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
                            Err(Some(f)) => (self.fail(f), 0),
                            Err(None) => {
                                self.counters.unsupported += 1;
                                (VIRTIO_BLK_S_UNSUPP as u8, 0)
                            }
                        }
                    }
                };
                (status, n, status_w)
            }
            // Some buffer is outside memory or not mapped as it must be: the request fails
            // without touching it.
            _ => (self.fail(Failure::Memory), 0, None),
        };
        let written = match status_writer {
            Some(mut w) => w.write_all(&[status]).is_ok(),
            // Still tell the driver, through the status byte alone when it is reachable.
            None => mem
                .write_obj(status, vm_memory::GuestAddress(status_at))
                .is_ok(),
        };
        if !written {
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
        VIRTIO_BLK_S_IOERR as u8
    }

    /// Runs a request whose header `r` has consumed; returns bytes written into the guest's
    /// data buffers. `lens` is `(data_len, out_len)`: the bytes `w` takes before the status,
    /// and the bytes `r` has left. `Err(None)` for an unknown type.
    fn execute<R: Read, W: Write>(
        &mut self,
        r: &mut R,
        w: &mut W,
        type_: u32,
        sector: u64,
        (data_len, out_len): (u64, u64),
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
                    w.write_all(&buf[..n]).map_err(|_| Some(Failure::Memory))?;
                    off += n as u64;
                }
                self.counters.reads += 1;
                self.counters.bytes_read += data_len;
                Ok(data_len)
            }
            VIRTIO_BLK_T_OUT => {
                let end = start.checked_add(out_len).ok_or(Some(Failure::Io))?;
                if self.read_only || end > disk_bytes {
                    return Err(Some(Failure::Io));
                }
                let mut buf = vec![0u8; CHUNK.min(out_len as usize)];
                let mut off = 0u64;
                while off < out_len {
                    let n = (out_len - off).min(CHUNK as u64) as usize;
                    r.read_exact(&mut buf[..n])
                        .map_err(|_| Some(Failure::Memory))?;
                    self.disk
                        .write_all_at(&buf[..n], start + off)
                        .map_err(|_| Some(Failure::Io))?;
                    off += n as u64;
                }
                self.counters.writes += 1;
                self.counters.bytes_written += out_len;
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
                let mut id = [0u8; ID_BYTES];
                let b = self.id.as_bytes();
                id[..b.len().min(ID_BYTES)].copy_from_slice(&b[..b.len().min(ID_BYTES)]);
                let n = data_len.min(ID_BYTES as u64) as usize;
                w.write_all(&id[..n]).map_err(|_| Some(Failure::Memory))?;
                Ok(n as u64)
            }
            _ => Err(None),
        }
    }
}
