//! A vfio-user client (the protocol of QEMU's `docs/interop/vfio-user.rst`, version 0.1): a
//! passthrough device served by another process over a UNIX socket, guest memory shared by
//! file descriptor.
//!
//! The `vfio_user` crate's own client always maps DMA read-write, ignores error replies to
//! DMA_MAP and DMA_UNMAP, and trusts the sizes a server sends; this one passes the mapping's
//! permissions, turns every error reply into an error, and validates every reply (message
//! ID, command, sizes) before using it, so a malformed or hostile server gets a clear error,
//! never a panic. It interoperates with the crate's `Server`, which the DMA test device uses.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const CMD_VERSION: u16 = 1;
const CMD_DMA_MAP: u16 = 2;
const CMD_DMA_UNMAP: u16 = 3;
const CMD_DEVICE_GET_INFO: u16 = 4;
const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
const CMD_GET_IRQ_INFO: u16 = 7;
const CMD_SET_IRQS: u16 = 8;
const CMD_REGION_READ: u16 = 9;
const CMD_REGION_WRITE: u16 = 10;
const CMD_DEVICE_RESET: u16 = 13;

const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
const HEADER_SIZE: usize = 16;
/// Largest reply accepted (the protocol's default `max_data_xfer_size` plus headers).
const MAX_REPLY: usize = (1 << 20) + 4096;
/// Largest data moved by one region read or write.
const MAX_XFER: usize = 1 << 20;
/// Most regions and IRQ indexes a device may claim.
const MAX_REGIONS: u32 = 64;

/// `VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER`.
const IRQ_SET_EVENTFD_TRIGGER: u32 = (1 << 2) | (1 << 5);
/// `VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER` with count 0: disable.
const IRQ_SET_NONE_TRIGGER: u32 = 1 | (1 << 5);
/// DMA_MAP flag: the device may read.
pub const DMA_MAP_READ: u32 = 1;
/// DMA_MAP flag: the device may write.
pub const DMA_MAP_WRITE: u32 = 2;

/// vfio-user client errors.
#[derive(Debug, thiserror::Error)]
pub enum VfioUserError {
    /// The socket failed (the device process is gone or hung).
    #[error("vfio-user socket")]
    Io(#[from] io::Error),
    /// The server's reply breaks the protocol.
    #[error("malformed reply to {command}: {what}")]
    Protocol {
        /// Command name.
        command: &'static str,
        /// What was wrong.
        what: String,
    },
    /// The server refused the command.
    #[error("device refused {command}: {}", io::Error::from_raw_os_error(*.errno as i32))]
    Refused {
        /// Command name.
        command: &'static str,
        /// errno from the reply.
        errno: u32,
    },
    /// A request the client will not send (out-of-range region, oversized transfer).
    #[error("{0}")]
    Invalid(String),
}

/// A region as the device reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0 when absent).
    pub size: u64,
}

/// An interrupt index as the device reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// `VFIO_IRQ_INFO_*`.
    pub flags: u32,
    /// Number of vectors.
    pub count: u32,
}

fn name(cmd: u16) -> &'static str {
    match cmd {
        CMD_VERSION => "VERSION",
        CMD_DMA_MAP => "DMA_MAP",
        CMD_DMA_UNMAP => "DMA_UNMAP",
        CMD_DEVICE_GET_INFO => "DEVICE_GET_INFO",
        CMD_DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        CMD_GET_IRQ_INFO => "GET_IRQ_INFO",
        CMD_SET_IRQS => "SET_IRQS",
        CMD_REGION_READ => "REGION_READ",
        CMD_REGION_WRITE => "REGION_WRITE",
        CMD_DEVICE_RESET => "DEVICE_RESET",
        _ => "unknown command",
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// A connection to one vfio-user device.
pub struct VfioUserClient {
    stream: UnixStream,
    next_id: u16,
    regions: Vec<RegionInfo>,
    num_irqs: u32,
    /// `VFIO_DEVICE_FLAGS_*` of the device.
    pub device_flags: u32,
}

impl VfioUserClient {
    /// Connects to the server at `path`, negotiates the version and reads the device's
    /// regions. Replies that take longer than `timeout` fail.
    ///
    /// # Errors
    /// [`VfioUserError`].
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, VfioUserError> {
        let stream = UnixStream::connect(path)?;
        Self::from_stream(stream, timeout)
    }

    /// As [`VfioUserClient::connect`] over an already connected stream.
    ///
    /// # Errors
    /// [`VfioUserError`].
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Self, VfioUserError> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut c = Self {
            stream,
            next_id: 0,
            regions: Vec::new(),
            num_irqs: 0,
            device_flags: 0,
        };
        c.version()?;
        let info = c.call(
            CMD_DEVICE_GET_INFO,
            &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[],
        )?;
        if info.len() < 16 {
            return Err(Self::bad(
                CMD_DEVICE_GET_INFO,
                "reply shorter than the device info",
            ));
        }
        c.device_flags = u32_at(&info, 4);
        let num_regions = u32_at(&info, 8);
        c.num_irqs = u32_at(&info, 12);
        if num_regions > MAX_REGIONS || c.num_irqs > MAX_REGIONS {
            return Err(Self::bad(
                CMD_DEVICE_GET_INFO,
                format!(
                    "{num_regions} regions and {} IRQ indexes is implausible",
                    c.num_irqs
                ),
            ));
        }
        for i in 0..num_regions {
            let r = c.get_region_info(i)?;
            c.regions.push(r);
        }
        Ok(c)
    }

    fn bad(cmd: u16, what: impl Into<String>) -> VfioUserError {
        VfioUserError::Protocol {
            command: name(cmd),
            what: what.into(),
        }
    }

    fn version(&mut self) -> Result<(), VfioUserError> {
        let caps = br#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576}}"#;
        let mut body = vec![0u8, 0, 1, 0]; // major 0, minor 1
        body.extend_from_slice(caps);
        body.push(0);
        let reply = self.call(CMD_VERSION, &body, &[])?;
        if reply.len() < 4 {
            return Err(Self::bad(CMD_VERSION, "reply shorter than a version"));
        }
        let major = u16::from_le_bytes([reply[0], reply[1]]);
        if major != 0 {
            return Err(Self::bad(
                CMD_VERSION,
                format!("unsupported major version {major}"),
            ));
        }
        Ok(())
    }

    /// Sends a command and returns the reply's body (after the header).
    fn call(&mut self, cmd: u16, body: &[u8], fds: &[RawFd]) -> Result<Vec<u8>, VfioUserError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let size = u32::try_from(HEADER_SIZE + body.len())
            .map_err(|_| VfioUserError::Invalid("message too large".into()))?;
        let mut header = Vec::with_capacity(HEADER_SIZE);
        header.extend_from_slice(&id.to_le_bytes());
        header.extend_from_slice(&cmd.to_le_bytes());
        header.extend_from_slice(&size.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        if fds.is_empty() {
            self.stream.write_all(&header)?;
            self.stream.write_all(body)?;
        } else {
            let mut msg = header;
            msg.extend_from_slice(body);
            let sent = self
                .stream
                .send_with_fds(&[&msg[..]], fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            if sent < msg.len() {
                self.stream.write_all(&msg[sent..])?;
            }
        }
        let mut h = [0u8; HEADER_SIZE];
        self.stream.read_exact(&mut h)?;
        let (rid, rcmd) = (
            u16::from_le_bytes([h[0], h[1]]),
            u16::from_le_bytes([h[2], h[3]]),
        );
        let (rsize, flags, errno) = (u32_at(&h, 4) as usize, u32_at(&h, 8), u32_at(&h, 12));
        if !(HEADER_SIZE..=MAX_REPLY).contains(&rsize) {
            return Err(Self::bad(cmd, format!("message size {rsize}")));
        }
        let mut rest = vec![0u8; rsize - HEADER_SIZE];
        self.stream.read_exact(&mut rest)?;
        if flags & 0xf != FLAG_REPLY {
            return Err(Self::bad(cmd, format!("not a reply (flags {flags:#x})")));
        }
        if rid != id || rcmd != cmd {
            return Err(Self::bad(
                cmd,
                format!("reply to message {rid} command {rcmd}"),
            ));
        }
        if flags & FLAG_ERROR != 0 {
            return Err(VfioUserError::Refused {
                command: name(cmd),
                errno,
            });
        }
        Ok(rest)
    }

    fn get_region_info(&mut self, index: u32) -> Result<RegionInfo, VfioUserError> {
        let mut body = vec![0u8; 32];
        body[..4].copy_from_slice(&32u32.to_le_bytes());
        body[8..12].copy_from_slice(&index.to_le_bytes());
        let r = self.call(CMD_DEVICE_GET_REGION_INFO, &body, &[])?;
        if r.len() < 32 {
            return Err(Self::bad(
                CMD_DEVICE_GET_REGION_INFO,
                "reply shorter than the region info",
            ));
        }
        if u32_at(&r, 8) != index {
            return Err(Self::bad(
                CMD_DEVICE_GET_REGION_INFO,
                format!("info for region {}", u32_at(&r, 8)),
            ));
        }
        Ok(RegionInfo {
            flags: u32_at(&r, 4),
            size: u64_at(&r, 16),
        })
    }

    /// The socket's file descriptor (for watching hang-ups; the client owns the data).
    pub fn socket_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// The device's regions, by index.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// Number of IRQ indexes.
    pub fn num_irqs(&self) -> u32 {
        self.num_irqs
    }

    fn check_access(&self, region: u32, offset: u64, len: usize) -> Result<(), VfioUserError> {
        let r = self
            .regions
            .get(region as usize)
            .ok_or_else(|| VfioUserError::Invalid(format!("no region {region}")))?;
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| VfioUserError::Invalid("access wraps".into()))?;
        if end > r.size {
            return Err(VfioUserError::Invalid(format!(
                "access {offset:#x}+{len:#x} beyond region {region} of {:#x} bytes",
                r.size
            )));
        }
        Ok(())
    }

    /// Reads `data.len()` bytes of region `region` at `offset`.
    ///
    /// # Errors
    /// [`VfioUserError`]; an access outside the region is not sent.
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), VfioUserError> {
        self.check_access(region, offset, data.len())?;
        for (k, chunk) in data.chunks_mut(MAX_XFER).enumerate() {
            let off = offset + (k * MAX_XFER) as u64;
            let mut body = Vec::with_capacity(16);
            body.extend_from_slice(&off.to_le_bytes());
            body.extend_from_slice(&region.to_le_bytes());
            body.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            let r = self.call(CMD_REGION_READ, &body, &[])?;
            if r.len() != 16 + chunk.len() || u32_at(&r, 12) as usize != chunk.len() {
                return Err(Self::bad(
                    CMD_REGION_READ,
                    format!(
                        "{} bytes of data for {} asked",
                        r.len().saturating_sub(16),
                        chunk.len()
                    ),
                ));
            }
            chunk.copy_from_slice(&r[16..]);
        }
        Ok(())
    }

    /// Writes `data` to region `region` at `offset`.
    ///
    /// # Errors
    /// [`VfioUserError`]; an access outside the region is not sent.
    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), VfioUserError> {
        self.check_access(region, offset, data.len())?;
        for (k, chunk) in data.chunks(MAX_XFER).enumerate() {
            let off = offset + (k * MAX_XFER) as u64;
            let mut body = Vec::with_capacity(16 + chunk.len());
            body.extend_from_slice(&off.to_le_bytes());
            body.extend_from_slice(&region.to_le_bytes());
            body.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            body.extend_from_slice(chunk);
            let r = self.call(CMD_REGION_WRITE, &body, &[])?;
            if r.len() < 16 || u32_at(&r, 12) as usize != chunk.len() {
                return Err(Self::bad(
                    CMD_REGION_WRITE,
                    "reply does not confirm the write",
                ));
            }
        }
        Ok(())
    }

    /// Information on IRQ index `index`.
    ///
    /// # Errors
    /// [`VfioUserError`].
    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo, VfioUserError> {
        if index >= self.num_irqs {
            return Err(VfioUserError::Invalid(format!("no IRQ index {index}")));
        }
        let mut body = vec![0u8; 16];
        body[..4].copy_from_slice(&16u32.to_le_bytes());
        body[8..12].copy_from_slice(&index.to_le_bytes());
        let r = self.call(CMD_GET_IRQ_INFO, &body, &[])?;
        if r.len() < 16 || u32_at(&r, 8) != index {
            return Err(Self::bad(
                CMD_GET_IRQ_INFO,
                "reply for another index or truncated",
            ));
        }
        Ok(IrqInfo {
            flags: u32_at(&r, 4),
            count: u32_at(&r, 12),
        })
    }

    /// Makes vectors `start..start + fds.len()` of IRQ index `index` signal `fds` (no fds:
    /// disable the index).
    ///
    /// # Errors
    /// [`VfioUserError`].
    pub fn set_irqs(&mut self, index: u32, start: u32, fds: &[RawFd]) -> Result<(), VfioUserError> {
        let flags = if fds.is_empty() {
            IRQ_SET_NONE_TRIGGER
        } else {
            IRQ_SET_EVENTFD_TRIGGER
        };
        let mut body = Vec::with_capacity(20);
        body.extend_from_slice(&20u32.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
        body.extend_from_slice(&index.to_le_bytes());
        body.extend_from_slice(&start.to_le_bytes());
        body.extend_from_slice(&(fds.len() as u32).to_le_bytes());
        self.call(CMD_SET_IRQS, &body, fds)?;
        Ok(())
    }

    /// Maps `[iova, iova + size)` to `offset` of the file `fd` with `flags`
    /// ([`DMA_MAP_READ`], [`DMA_MAP_WRITE`]).
    ///
    /// # Errors
    /// [`VfioUserError`].
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        fd: &impl AsRawFd,
        offset: u64,
        flags: u32,
    ) -> Result<(), VfioUserError> {
        let mut body = Vec::with_capacity(32);
        body.extend_from_slice(&32u32.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&iova.to_le_bytes());
        body.extend_from_slice(&size.to_le_bytes());
        self.call(CMD_DMA_MAP, &body, &[fd.as_raw_fd()])?;
        Ok(())
    }

    /// Unmaps `[iova, iova + size)`.
    ///
    /// # Errors
    /// [`VfioUserError`].
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), VfioUserError> {
        let mut body = Vec::with_capacity(24);
        body.extend_from_slice(&24u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&iova.to_le_bytes());
        body.extend_from_slice(&size.to_le_bytes());
        self.call(CMD_DMA_UNMAP, &body, &[])?;
        Ok(())
    }

    /// Resets the device.
    ///
    /// # Errors
    /// [`VfioUserError`].
    pub fn reset(&mut self) -> Result<(), VfioUserError> {
        self.call(CMD_DEVICE_RESET, &[], &[])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::thread;

    use super::*;

    /// A server that answers VERSION properly, then sends `bad` as the reply to the next
    /// command.
    fn hostile(bad: Vec<u8>) -> Result<VfioUserClient, VfioUserError> {
        let dir = std::env::temp_dir().join(format!("vu-{}-{}", std::process::id(), rand_suffix()));
        let listener = UnixListener::bind(&dir).unwrap();
        let t = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let size = u32_at(&h, 4) as usize;
            let mut rest = vec![0u8; size - 16];
            s.read_exact(&mut rest).unwrap();
            // A good VERSION reply.
            let caps = b"{}\0";
            let mut r = vec![h[0], h[1], 1, 0];
            r.extend_from_slice(&((16 + 4 + caps.len()) as u32).to_le_bytes());
            r.extend_from_slice(&1u32.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&[0, 0, 1, 0]);
            r.extend_from_slice(caps);
            s.write_all(&r).unwrap();
            // Whatever comes next gets `bad`.
            let _ = s.read(&mut [0u8; 64]);
            let _ = s.write_all(&bad);
            thread::sleep(Duration::from_millis(100));
        });
        let r = VfioUserClient::connect(&dir, Duration::from_secs(2));
        let _ = std::fs::remove_file(&dir);
        t.join().unwrap();
        r
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn header(id: u16, cmd: u16, size: u32, flags: u32, errno: u32) -> Vec<u8> {
        let mut h = id.to_le_bytes().to_vec();
        h.extend_from_slice(&cmd.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&errno.to_le_bytes());
        h
    }

    #[test]
    fn malformed_replies_are_refused() {
        // Truncated: the socket closes mid-header.
        assert!(matches!(hostile(vec![1, 0, 4]), Err(VfioUserError::Io(_))));
        // A size below the header.
        let e = hostile(header(1, 4, 3, 1, 0)).err().unwrap();
        assert!(e.to_string().contains("message size 3"), "{e}");
        // A huge size.
        let e = hostile(header(1, 4, u32::MAX, 1, 0)).err().unwrap();
        assert!(e.to_string().contains("message size"), "{e}");
        // Wrong command in the reply.
        let mut r = header(1, 9, 32, 1, 0);
        r.extend_from_slice(&[0; 16]);
        let e = hostile(r).err().unwrap();
        assert!(e.to_string().contains("command 9"), "{e}");
        // A device info too short.
        let mut r = header(1, 4, 20, 1, 0);
        r.extend_from_slice(&[0; 4]);
        let e = hostile(r).err().unwrap();
        assert!(e.to_string().contains("shorter"), "{e}");
        // Too many regions.
        let mut r = header(1, 4, 32, 1, 0);
        r.extend_from_slice(&16u32.to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        r.extend_from_slice(&100_000u32.to_le_bytes());
        r.extend_from_slice(&1u32.to_le_bytes());
        let e = hostile(r).err().unwrap();
        assert!(e.to_string().contains("implausible"), "{e}");
        // An error reply.
        let e = hostile(header(1, 4, 16, 1 | FLAG_ERROR, 22)).err().unwrap();
        assert!(matches!(e, VfioUserError::Refused { errno: 22, .. }), "{e}");
    }

    /// One reply message.
    fn reply(id: u16, cmd: u16, body: &[u8]) -> Vec<u8> {
        let mut r = header(id, cmd, (16 + body.len()) as u32, FLAG_REPLY, 0);
        r.extend_from_slice(body);
        r
    }

    /// Everything a well-behaved server with two 256-byte regions and one IRQ index says to
    /// the calls `conversation` makes, in order.
    fn scripted_server() -> Vec<u8> {
        let mut out = Vec::new();
        let mut version = vec![0, 0, 1, 0];
        version.extend_from_slice(b"{}\0");
        out.extend(reply(0, CMD_VERSION, &version));
        let mut info = 16u32.to_le_bytes().to_vec();
        info.extend_from_slice(&0u32.to_le_bytes());
        info.extend_from_slice(&2u32.to_le_bytes());
        info.extend_from_slice(&1u32.to_le_bytes());
        out.extend(reply(1, CMD_DEVICE_GET_INFO, &info));
        for i in 0..2u32 {
            let mut r = vec![0u8; 32];
            r[..4].copy_from_slice(&32u32.to_le_bytes());
            r[4..8].copy_from_slice(&3u32.to_le_bytes());
            r[8..12].copy_from_slice(&i.to_le_bytes());
            r[16..24].copy_from_slice(&256u64.to_le_bytes());
            out.extend(reply(2 + i as u16, CMD_DEVICE_GET_REGION_INFO, &r));
        }
        let mut id = 4u16;
        for i in 0..2u32 {
            let mut rd = 0u64.to_le_bytes().to_vec();
            rd.extend_from_slice(&i.to_le_bytes());
            rd.extend_from_slice(&64u32.to_le_bytes());
            rd.extend_from_slice(&[0xab; 64]);
            out.extend(reply(id, CMD_REGION_READ, &rd));
            let mut wr = 8u64.to_le_bytes().to_vec();
            wr.extend_from_slice(&i.to_le_bytes());
            wr.extend_from_slice(&4u32.to_le_bytes());
            out.extend(reply(id + 1, CMD_REGION_WRITE, &wr));
            id += 2;
        }
        let mut irq = 16u32.to_le_bytes().to_vec();
        irq.extend_from_slice(&0u32.to_le_bytes());
        irq.extend_from_slice(&0u32.to_le_bytes());
        irq.extend_from_slice(&1u32.to_le_bytes());
        out.extend(reply(id, CMD_GET_IRQ_INFO, &irq));
        out.extend(reply(id + 1, CMD_SET_IRQS, &[]));
        out.extend(reply(id + 2, CMD_DMA_MAP, &[]));
        out.extend(reply(id + 3, CMD_DMA_UNMAP, &[]));
        out.extend(reply(id + 4, CMD_DEVICE_RESET, &[]));
        out
    }

    /// The calls the `vfio_user_replies` fuzz target makes, against `server` (everything the
    /// server says).
    fn conversation(server: &[u8]) -> Result<(), VfioUserError> {
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        server_end.write_all(server).unwrap();
        server_end.shutdown(std::net::Shutdown::Write).unwrap();
        let mut c = VfioUserClient::from_stream(client_end, Duration::from_millis(50))?;
        let memfd = std::fs::File::open("/dev/null").unwrap();
        let mut buf = [0u8; 64];
        for i in 0..c.regions().len().min(4) as u32 {
            c.region_read(i, 0, &mut buf)?;
            c.region_write(i, 8, &buf[..4])?;
        }
        c.irq_info(0)?;
        c.set_irqs(0, 0, &[])?;
        c.dma_map(0x10000, 0x2000, &memfd, 0, 3)?;
        c.dma_unmap(0x10000, 0x2000)?;
        c.reset()
    }

    #[test]
    fn a_whole_conversation_and_every_truncation_of_it() {
        let script = scripted_server();
        conversation(&script).unwrap();
        // The fuzz target starts from this conversation (tests/fuzz.sh asks for it).
        if let Some(dir) = std::env::var_os("VMM_FUZZ_SEED_DIR") {
            let dir = std::path::Path::new(&dir).join("vfio_user_replies");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("conversation"), &script).unwrap();
        }
        // Cut anywhere, the client fails cleanly.
        for cut in (0..script.len()).step_by(7) {
            assert!(conversation(&script[..cut]).is_err(), "cut at {cut}");
        }
    }
}
