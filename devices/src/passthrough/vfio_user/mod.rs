//! A vfio-user client (the protocol of QEMU's `docs/interop/vfio-user.rst`, version 0.1): a
//! passthrough device served by another process over a UNIX socket. Guest memory is shared
//! by file descriptor (`DMA_MAP` with an fd) or, with `dma=messages`, not at all: the server
//! reads and writes it with `DMA_READ`/`DMA_WRITE`, which this client answers between its
//! own calls. Migration and dirty logging are `DEVICE_FEATURE` (migration v2, DMA logging)
//! and `MIG_DATA_READ`/`MIG_DATA_WRITE`; BAR areas the server offers for mmap (sparse mmap)
//! and its region I/O fds (`GET_REGION_IO_FDS`, as ioeventfds) are used when offered.
//!
//! The `vfio_user` crate's own client always maps DMA read-write, ignores error replies to
//! DMA_MAP and DMA_UNMAP, and trusts the sizes a server sends; this one passes the mapping's
//! permissions, turns every error reply into an error, and validates every reply (message
//! ID, command, sizes) before using it, so a malformed or hostile server gets a clear error,
//! never a panic. It interoperates with the crate's `Server`, which the DMA test device uses.

pub mod caps;
mod feature;

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub use caps::{ServerCaps, CLIENT_MAX_XFER};
pub use feature::{MigrationFeature, MAX_LOGGING_RANGES, MAX_MIGRATION_DATA};

const CMD_VERSION: u16 = 1;
const CMD_DMA_MAP: u16 = 2;
const CMD_DMA_UNMAP: u16 = 3;
const CMD_DEVICE_GET_INFO: u16 = 4;
const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
const CMD_DEVICE_GET_REGION_IO_FDS: u16 = 6;
const CMD_GET_IRQ_INFO: u16 = 7;
const CMD_SET_IRQS: u16 = 8;
const CMD_REGION_READ: u16 = 9;
const CMD_REGION_WRITE: u16 = 10;
const CMD_DMA_READ: u16 = 11;
const CMD_DMA_WRITE: u16 = 12;
const CMD_DEVICE_RESET: u16 = 13;
const CMD_DEVICE_FEATURE: u16 = 16;
const CMD_MIG_DATA_READ: u16 = 17;
const CMD_MIG_DATA_WRITE: u16 = 18;

const FLAG_REPLY: u32 = 1;
const FLAG_NO_REPLY: u32 = 1 << 4;
const FLAG_ERROR: u32 = 1 << 5;
const HEADER_SIZE: usize = 16;
/// Largest message accepted from a server (the data of one transfer plus headers).
const MAX_MESSAGE: usize = CLIENT_MAX_XFER as usize + 4096;
/// Most regions and IRQ indexes a device may claim.
const MAX_REGIONS: u32 = 64;
/// Largest region info (with its capabilities) asked for.
const MAX_REGION_INFO: u32 = 4096;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
const VFIO_REGION_INFO_FLAG_MMAP: u32 = vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP;
/// `VFIO_REGION_INFO_FLAG_CAPS`.
const VFIO_REGION_INFO_FLAG_CAPS: u32 = vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_CAPS;
/// Server commands served in one [`VfioUserClient::serve_server_commands`] call.
const SERVE_BATCH: usize = 64;

/// `VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER`.
const IRQ_SET_EVENTFD_TRIGGER: u32 = vfio_bindings::bindings::vfio::VFIO_IRQ_SET_DATA_EVENTFD
    | vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_TRIGGER;
/// `VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER` with count 0: disable.
const IRQ_SET_NONE_TRIGGER: u32 = vfio_bindings::bindings::vfio::VFIO_IRQ_SET_DATA_NONE
    | vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_TRIGGER;
/// DMA_MAP flag: the device may read (`VFIO_DMA_MAP_FLAG_READ`, as vfio-user uses it).
pub const DMA_MAP_READ: u32 = vfio_bindings::bindings::vfio::VFIO_DMA_MAP_FLAG_READ;
/// DMA_MAP flag: the device may write (`VFIO_DMA_MAP_FLAG_WRITE`).
pub const DMA_MAP_WRITE: u32 = vfio_bindings::bindings::vfio::VFIO_DMA_MAP_FLAG_WRITE;

/// Guest memory as the client lets a server reach it by message: the answers to the
/// server-to-client `VFIO_USER_DMA_READ` and `VFIO_USER_DMA_WRITE` commands (vfio-user.rst,
/// "Read and Write Operations"). Called on whichever thread reads the server's message,
/// with the client's own lock held: an implementation takes no lock a client caller may
/// hold.
pub trait DmaAccess: Send + Sync {
    /// Reads `data.len()` bytes at DMA address (IOVA) `iova`.
    ///
    /// # Errors
    /// The errno of the error reply (`EFAULT`: not mapped, `EPERM`: not readable).
    fn dma_read(&self, iova: u64, data: &mut [u8]) -> Result<(), i32>;
    /// Writes `data` at DMA address (IOVA) `iova`.
    ///
    /// # Errors
    /// As [`DmaAccess::dma_read`] (`EPERM`: not writable).
    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), i32>;
}

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
        CMD_DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
        CMD_DMA_READ => "DMA_READ",
        CMD_DMA_WRITE => "DMA_WRITE",
        CMD_DEVICE_FEATURE => "DEVICE_FEATURE",
        CMD_MIG_DATA_READ => "MIG_DATA_READ",
        CMD_MIG_DATA_WRITE => "MIG_DATA_WRITE",
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

/// An ioeventfd sub-region of `DEVICE_GET_REGION_IO_FDS`: `(offset, size, datamatch,
/// eventfd)`.
pub type IoFd = (u64, u64, Option<u64>, Arc<std::fs::File>);

/// A message header's fields: `(message ID, command, flags, errno)`.
type Head = (u16, u16, u32, u32);

/// A connection to one vfio-user device.
pub struct VfioUserClient {
    stream: UnixStream,
    next_id: u16,
    regions: Vec<RegionInfo>,
    num_irqs: u32,
    /// `VFIO_DEVICE_FLAGS_*` of the device.
    pub device_flags: u32,
    /// What the server announced in its VERSION reply.
    caps: ServerCaps,
    /// The longest one call (a request, any server commands served meanwhile, the reply)
    /// may take.
    timeout: Duration,
    /// Answers the server's DMA_READ and DMA_WRITE (none: they are refused with `EINVAL`).
    dma: Option<Arc<dyn DmaAccess>>,
    /// Server commands answered: `(DMA_READ, DMA_WRITE, refused)`.
    served: (u64, u64, u64),
    /// The file descriptors that came with the last message.
    fds: Vec<std::fs::File>,
    /// Per region, what of it may be mapped (the sparse-mmap capability and its file).
    mmaps: Vec<Option<RegionMmap>>,
}

/// The parts of a region the client may map instead of sending messages
/// (`VFIO_REGION_INFO_CAP_SPARSE_MMAP` with the file the server sent with the region info).
#[derive(Debug, Clone)]
pub struct RegionMmap {
    /// The file to map.
    pub file: Arc<std::fs::File>,
    /// Offset of the region in the file (the region info's `offset`).
    pub file_offset: u64,
    /// `(offset, size)` in the region, page-aligned.
    pub areas: Vec<(u64, u64)>,
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
            caps: ServerCaps::default(),
            timeout,
            dma: None,
            served: (0, 0, 0),
            fds: Vec::new(),
            mmaps: Vec::new(),
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
        let mut body = vec![0u8, 0, 1, 0]; // major 0, minor 1
        body.extend_from_slice(caps::client_json().as_bytes());
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
        self.caps = ServerCaps::parse(&reply[4..]).map_err(|e| Self::bad(CMD_VERSION, e))?;
        Ok(())
    }

    /// What the server announced in its VERSION reply.
    pub fn caps(&self) -> &ServerCaps {
        &self.caps
    }

    /// Lets the server reach guest memory by message: `access` answers its DMA_READ and
    /// DMA_WRITE commands from now on.
    pub fn set_dma_access(&mut self, access: Arc<dyn DmaAccess>) {
        self.dma = Some(access);
    }

    /// Server commands answered so far: `(DMA_READ, DMA_WRITE, refused)`.
    pub fn served(&self) -> (u64, u64, u64) {
        self.served
    }

    /// Reads exactly `buf.len()` bytes before `deadline`: a server that trickles bytes
    /// runs out of time as surely as a silent one.
    fn read_by(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), VfioUserError> {
        let late = || {
            VfioUserError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "the device process did not answer in time",
            ))
        };
        let mut done = 0;
        while done < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(late());
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => return Err(VfioUserError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(late())
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// One whole message: its header fields `(id, command, flags, errno)` and body.
    fn read_message(
        &mut self,
        cmd: u16,
        deadline: Instant,
    ) -> Result<(Head, Vec<u8>), VfioUserError> {
        let mut h = [0u8; HEADER_SIZE];
        self.recv_head(&mut h, deadline)?;
        let (rid, rcmd) = (
            u16::from_le_bytes([h[0], h[1]]),
            u16::from_le_bytes([h[2], h[3]]),
        );
        let (rsize, flags, errno) = (u32_at(&h, 4) as usize, u32_at(&h, 8), u32_at(&h, 12));
        if !(HEADER_SIZE..=MAX_MESSAGE).contains(&rsize) {
            return Err(Self::bad(cmd, format!("message size {rsize}")));
        }
        let mut rest = vec![0u8; rsize - HEADER_SIZE];
        self.read_by(&mut rest, deadline)?;
        Ok(((rid, rcmd, flags, errno), rest))
    }

    /// Reads a message header, keeping the file descriptors that came with it (in
    /// `self.fds`, until the next message).
    fn recv_head(
        &mut self,
        h: &mut [u8; HEADER_SIZE],
        deadline: Instant,
    ) -> Result<(), VfioUserError> {
        self.fds.clear();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return self.read_by(h, deadline);
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut fds = [0 as RawFd; 4];
        let mut iov = [libc::iovec {
            iov_base: h.as_mut_ptr().cast(),
            iov_len: HEADER_SIZE,
        }];
        // SAFETY: the iovec points at `h`, alive and HEADER_SIZE bytes long; `fds` has room
        // for four descriptors.
        let r = unsafe { self.stream.recv_with_fds(&mut iov, &mut fds) };
        let (n, nfds) = match r {
            Ok(v) => v,
            Err(e) if matches!(e.errno(), libc::EAGAIN | libc::EINTR) => (0, 0),
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        };
        for &fd in &fds[..nfds] {
            // SAFETY: the kernel installed these descriptors for us; nothing else owns them.
            self.fds.push(unsafe { std::fs::File::from_raw_fd(fd) });
        }
        if n == 0 && nfds == 0 && r.is_ok() {
            return Err(VfioUserError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        self.read_by(&mut h[n..], deadline)
    }

    fn send(&mut self, msg: &[u8], fds: &[RawFd]) -> Result<(), VfioUserError> {
        if fds.is_empty() {
            self.stream.write_all(msg)?;
        } else {
            let sent = self
                .stream
                .send_with_fds(&[msg], fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            if sent < msg.len() {
                self.stream.write_all(&msg[sent..])?;
            }
        }
        Ok(())
    }

    /// Answers one command the server sent (DMA_READ or DMA_WRITE): the data, or an error
    /// reply with its errno. Anything else the server may not send is answered `EINVAL`.
    fn serve_command(
        &mut self,
        (id, cmd, flags, _): Head,
        body: &[u8],
    ) -> Result<(), VfioUserError> {
        let reply = |body: &[u8], errno: u32| {
            let mut m = Vec::with_capacity(HEADER_SIZE + body.len());
            m.extend_from_slice(&id.to_le_bytes());
            m.extend_from_slice(&cmd.to_le_bytes());
            m.extend_from_slice(&((HEADER_SIZE + body.len()) as u32).to_le_bytes());
            let f = if errno == 0 {
                FLAG_REPLY
            } else {
                FLAG_REPLY | FLAG_ERROR
            };
            m.extend_from_slice(&f.to_le_bytes());
            m.extend_from_slice(&errno.to_le_bytes());
            m.extend_from_slice(body);
            m
        };
        let access = (body.len() >= 16).then(|| (u64_at(body, 0), u64_at(body, 8)));
        let result: Result<Vec<u8>, i32> = match (cmd, access, &self.dma) {
            (_, _, None) | (_, None, _) => Err(libc::EINVAL),
            (_, Some((_, count)), _) if count > u64::from(CLIENT_MAX_XFER) => Err(libc::EINVAL),
            (CMD_DMA_READ, Some((addr, count)), Some(d)) => {
                let mut data = vec![0u8; count as usize];
                d.dma_read(addr, &mut data).map(|()| {
                    let mut r = Vec::with_capacity(16 + data.len());
                    r.extend_from_slice(&addr.to_le_bytes());
                    r.extend_from_slice(&count.to_le_bytes());
                    r.extend_from_slice(&data);
                    r
                })
            }
            (CMD_DMA_WRITE, Some((addr, count)), Some(d)) => {
                if body.len() != 16 + count as usize {
                    Err(libc::EINVAL)
                } else {
                    d.dma_write(addr, &body[16..]).map(|()| {
                        let mut r = addr.to_le_bytes().to_vec();
                        r.extend_from_slice(&count.to_le_bytes());
                        r
                    })
                }
            }
            _ => Err(libc::EINVAL),
        };
        let msg = match result {
            Ok(data) => {
                if cmd == CMD_DMA_READ {
                    self.served.0 += 1;
                } else {
                    self.served.1 += 1;
                }
                reply(&data, 0)
            }
            Err(e) => {
                self.served.2 += 1;
                reply(&[], e as u32)
            }
        };
        if flags & FLAG_NO_REPLY != 0 {
            return Ok(());
        }
        self.send(&msg, &[])
    }

    /// Serves the commands the server sent while no request of ours is outstanding (its
    /// socket is readable). Returns how many were served; at most a batch per call, so a
    /// flooding server cannot hold the caller's thread.
    ///
    /// # Errors
    /// A reply nobody asked for, a malformed message or a dead socket.
    pub fn serve_server_commands(&mut self) -> Result<usize, VfioUserError> {
        let mut served = 0;
        while served < SERVE_BATCH {
            let mut peek = [0u8; HEADER_SIZE];
            // SAFETY: a peek into a local buffer of the given length.
            let n = unsafe {
                libc::recv(
                    self.stream.as_raw_fd(),
                    peek.as_mut_ptr().cast(),
                    peek.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                if n == 0 {
                    return Err(VfioUserError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(e.into());
            }
            let deadline = Instant::now() + self.timeout;
            let (h, body) = self.read_message(0, deadline)?;
            if h.2 & 0xf != 0 {
                return Err(Self::bad(h.1, "a reply to nothing asked"));
            }
            self.serve_command(h, &body)?;
            served += 1;
        }
        Ok(served)
    }

    /// Sends a command and returns the reply's body (after the header). Commands the server
    /// sends meanwhile are answered; the reply is the message of the same ID and command.
    /// The whole exchange has one deadline.
    fn call(&mut self, cmd: u16, body: &[u8], fds: &[RawFd]) -> Result<Vec<u8>, VfioUserError> {
        let deadline = Instant::now() + self.timeout;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let size = u32::try_from(HEADER_SIZE + body.len())
            .map_err(|_| VfioUserError::Invalid("message too large".into()))?;
        let mut msg = Vec::with_capacity(HEADER_SIZE + body.len());
        msg.extend_from_slice(&id.to_le_bytes());
        msg.extend_from_slice(&cmd.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
        msg.extend_from_slice(body);
        self.send(&msg, fds)?;
        loop {
            let (h, rest) = self.read_message(cmd, deadline)?;
            let (rid, rcmd, flags, errno) = h;
            if flags & 0xf == 0 {
                // A command from the server: answered, never taken for the reply.
                self.serve_command(h, &rest)?;
                continue;
            }
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
            return Ok(rest);
        }
    }

    fn get_region_info(&mut self, index: u32) -> Result<RegionInfo, VfioUserError> {
        let ask = |c: &mut Self, argsz: u32| -> Result<Vec<u8>, VfioUserError> {
            let mut body = vec![0u8; 32];
            body[..4].copy_from_slice(&argsz.to_le_bytes());
            body[8..12].copy_from_slice(&index.to_le_bytes());
            let r = c.call(CMD_DEVICE_GET_REGION_INFO, &body, &[])?;
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
            Ok(r)
        };
        let mut r = ask(self, 32)?;
        let flags = u32_at(&r, 4);
        let want = u32_at(&r, 0);
        // Capabilities follow when the server has any; ask again with room for them.
        if flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && want > 32 {
            r = ask(self, want.min(MAX_REGION_INFO))?;
        }
        let info = RegionInfo {
            flags,
            size: u64_at(&r, 16),
        };
        let file = self.fds.pop();
        let areas = caps::sparse_areas(&r, info.size)
            .map_err(|e| Self::bad(CMD_DEVICE_GET_REGION_INFO, format!("region {index}: {e}")))?;
        let mmap = match (file, areas, flags & VFIO_REGION_INFO_FLAG_MMAP != 0) {
            (Some(f), Some(areas), true) if !areas.is_empty() => Some(RegionMmap {
                file: Arc::new(f),
                file_offset: u64_at(&r, 24),
                areas,
            }),
            _ => None,
        };
        self.mmaps.push(mmap);
        Ok(info)
    }

    /// `VFIO_USER_DEVICE_GET_REGION_IO_FDS` of region `index`: the ioeventfds the server
    /// offers (writes to `[offset, offset + size)` signal the eventfd instead of a message),
    /// as `(offset, size, datamatch, eventfd)`. A server that refuses the command offers none.
    ///
    /// # Errors
    /// A malformed reply (a sub-region outside the region, an fd index without a
    /// descriptor, a type other than ioeventfd is skipped).
    pub fn region_io_fds(&mut self, index: u32) -> Result<Vec<IoFd>, VfioUserError> {
        const MAX_SUBS: u32 = 64;
        let size = self
            .regions
            .get(index as usize)
            .ok_or_else(|| VfioUserError::Invalid(format!("no region {index}")))?
            .size;
        let mut body = Vec::with_capacity(16);
        body.extend_from_slice(&(16 + 40 * MAX_SUBS).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&index.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        let r = match self.call(CMD_DEVICE_GET_REGION_IO_FDS, &body, &[]) {
            Ok(r) => r,
            Err(VfioUserError::Refused { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let bad = |w: String| Self::bad(CMD_DEVICE_GET_REGION_IO_FDS, w);
        if r.len() < 16 || u32_at(&r, 8) != index {
            return Err(bad(
                "reply shorter than its header or for another region".into()
            ));
        }
        let count = u32_at(&r, 12);
        if count > MAX_SUBS || r.len() < 16 + 40 * count as usize {
            return Err(bad(format!("{count} sub-regions in {} bytes", r.len())));
        }
        let files: Vec<Arc<std::fs::File>> = self.fds.drain(..).map(Arc::new).collect();
        let mut out = Vec::new();
        for i in 0..count as usize {
            let e = &r[16 + 40 * i..16 + 40 * (i + 1)];
            let (off, len) = (u64_at(e, 0), u64_at(e, 8));
            let (fd_index, kind, flags) = (u32_at(e, 16), u32_at(e, 20), u32_at(e, 24));
            if off.checked_add(len.max(1)).is_none_or(|end| end > size) {
                return Err(bad(format!(
                    "sub-region {off:#x}+{len:#x} outside the region"
                )));
            }
            let file = files
                .get(fd_index as usize)
                .ok_or_else(|| bad(format!("fd index {fd_index} without a descriptor")))?;
            if kind != 0 {
                log::debug!("region {index}: sub-region of type {kind} (not an ioeventfd) skipped");
                continue;
            }
            let datamatch = (flags & 1 != 0).then(|| u64_at(e, 32));
            out.push((off, len, datamatch, file.clone()));
        }
        Ok(out)
    }

    /// What of region `index` may be mapped directly, if the server offered it.
    pub fn region_mmap(&self, index: u32) -> Option<&RegionMmap> {
        self.mmaps.get(index as usize)?.as_ref()
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
        let max = self.caps.xfer();
        for (k, chunk) in data.chunks_mut(max).enumerate() {
            let off = offset + (k * max) as u64;
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
        let max = self.caps.xfer();
        for (k, chunk) in data.chunks(max).enumerate() {
            let off = offset + (k * max) as u64;
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
        // No more descriptors in one message than the server takes.
        let most = self.caps.max_msg_fds.max(1) as usize;
        if fds.len() > most {
            for (k, part) in fds.chunks(most).enumerate() {
                self.set_irqs(index, start + (k * most) as u32, part)?;
            }
            return Ok(());
        }
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
    /// ([`DMA_MAP_READ`], [`DMA_MAP_WRITE`]); without a file, the server reaches the range
    /// only through DMA_READ and DMA_WRITE messages.
    ///
    /// # Errors
    /// [`VfioUserError`].
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        fd: Option<&dyn AsRawFd>,
        offset: u64,
        flags: u32,
    ) -> Result<(), VfioUserError> {
        let mut body = Vec::with_capacity(32);
        body.extend_from_slice(&32u32.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&iova.to_le_bytes());
        body.extend_from_slice(&size.to_le_bytes());
        match fd {
            Some(fd) => self.call(CMD_DMA_MAP, &body, &[fd.as_raw_fd()])?,
            None => self.call(CMD_DMA_MAP, &body, &[])?,
        };
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
mod server_tests;
#[cfg(test)]
pub(crate) mod tests;
