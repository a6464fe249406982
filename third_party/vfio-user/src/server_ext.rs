// Copyright © 2026 The vmm-viommu project authors
//
// SPDX-License-Identifier: Apache-2.0
//

//! Server-side parts of the protocol that the published crate lacks:
//!
//! - `VFIO_USER_DEVICE_FEATURE` (command 16) with the migration v2 and DMA logging features of
//!   `<linux/vfio.h>`, `VFIO_USER_MIG_DATA_READ` (17) and `VFIO_USER_MIG_DATA_WRITE` (18):
//!   decoded here, carried out by [`crate::ServerBackend`]'s methods;
//! - the capabilities a server announces in its `VFIO_USER_VERSION` reply
//!   ([`ServerCapabilities`]);
//! - server-to-client `VFIO_USER_DMA_READ` (11) and `VFIO_USER_DMA_WRITE` (12) on the main
//!   socket, through a [`DmaHandle`] any thread of the server may use while the server loop
//!   goes on serving the client's commands.
//!
//! Source: QEMU's `docs/interop/vfio-user.rst` ("VFIO_USER_DEVICE_FEATURE", "Read and Write
//! Operations"), and `struct vfio_device_feature*` in `<linux/vfio.h>` for the layouts.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
};

use crate::{Command, Error, Header, HeaderFlags, ServerBackend};
use vm_memory::ByteValued;

/// Locks `m`, taking the data even when a holder panicked: the reader thread and the serving
/// thread share these maps, and one of them failing must not take the other down with it.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Most ranges a `DMA_LOGGING_START` may name.
pub const MAX_LOGGING_RANGES: u32 = 4096;

/// The capabilities a server announces in its `VFIO_USER_VERSION` reply (the JSON object
/// under `"capabilities"`). `extra` holds named extensions beyond the specification, which a
/// client uses only when it finds them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ServerCapabilities {
    /// File descriptors the server accepts in one message.
    pub max_msg_fds: u32,
    /// Largest `count` of a data transfer message, in bytes.
    pub max_data_xfer_size: u32,
    /// DMA map windows valid at once.
    pub max_dma_maps: u32,
    /// Page sizes of DMA maps, or'ed together (4096: 4 KiB pages only).
    pub pgsizes: u64,
    /// Migration: page size of dirty bitmaps and the largest bitmap in bytes.
    pub migration: MigrationCapabilities,
    /// Named extensions.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The `migration` object of the capabilities.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationCapabilities {
    /// Page size of the dirty bitmaps, in bytes.
    pub pgsize: u64,
    /// Largest dirty bitmap, in bytes.
    pub max_bitmap_size: u64,
}

impl Default for ServerCapabilities {
    fn default() -> Self {
        Self {
            max_msg_fds: 16,
            max_data_xfer_size: 1 << 20,
            max_dma_maps: 65535,
            pgsizes: 4096,
            migration: MigrationCapabilities {
                pgsize: 4096,
                max_bitmap_size: 256 << 20,
            },
            extra: serde_json::Map::new(),
        }
    }
}

/// What the server learns of the client from its `VFIO_USER_VERSION` request.
#[derive(Deserialize, Debug, Clone, Copy)]
pub(crate) struct ClientCapabilities {
    #[serde(default = "default_client_xfer")]
    pub max_data_xfer_size: u32,
}

fn default_client_xfer() -> u32 {
    1 << 20
}

impl Default for ClientCapabilities {
    fn default() -> Self {
        Self {
            max_data_xfer_size: default_client_xfer(),
        }
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Carries out one `VFIO_USER_DEVICE_FEATURE` request (`payload`: `argsz`, `flags`, data) and
/// returns the reply payload.
///
/// # Errors
/// An errno for the reply: `EINVAL` for a malformed request or GET with SET, `ENOTSUP` for a
/// feature or method the backend lacks, the backend's own error otherwise.
pub(crate) fn device_feature(
    backend: &mut dyn ServerBackend,
    payload: &[u8],
    max_reply: usize,
) -> Result<Vec<u8>, io::Error> {
    let argsz = u32_at(payload, 0).ok_or_else(|| errno(libc::EINVAL))? as usize;
    let flags = u32_at(payload, 4).ok_or_else(|| errno(libc::EINVAL))?;
    let data = &payload[8..];
    let feature = flags & VFIO_DEVICE_FEATURE_MASK;
    let (get, set, probe) = (
        flags & VFIO_DEVICE_FEATURE_GET != 0,
        flags & VFIO_DEVICE_FEATURE_SET != 0,
        flags & VFIO_DEVICE_FEATURE_PROBE != 0,
    );
    if get && set && !probe {
        return Err(errno(libc::EINVAL));
    }
    if flags
        & !(VFIO_DEVICE_FEATURE_MASK
            | VFIO_DEVICE_FEATURE_GET
            | VFIO_DEVICE_FEATURE_SET
            | VFIO_DEVICE_FEATURE_PROBE)
        != 0
    {
        return Err(errno(libc::EINVAL));
    }
    // Which methods each feature has: (GET, SET).
    let migration = backend.migration_flags().is_some();
    let logging = backend.dma_logging_supported();
    let methods = match feature {
        VFIO_DEVICE_FEATURE_MIGRATION if migration => (true, false),
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if migration => (true, true),
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP if logging => {
            (false, true)
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT if logging => (true, false),
        _ => (false, false),
    };
    if (get && !methods.0) || (set && !methods.1) || (!get && !set && methods == (false, false)) {
        return Err(errno(libc::ENOTSUP));
    }
    let header = |argsz: usize| {
        let mut r = Vec::with_capacity(argsz);
        r.extend_from_slice(&(argsz as u32).to_le_bytes());
        r.extend_from_slice(&flags.to_le_bytes());
        r
    };
    if probe {
        return Ok(header(8));
    }
    match feature {
        VFIO_DEVICE_FEATURE_MIGRATION => {
            if argsz < 16 {
                return Err(errno(libc::EINVAL));
            }
            let mut r = header(16);
            r.extend_from_slice(&backend.migration_flags().unwrap_or(0).to_le_bytes());
            Ok(r)
        }
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
            if set {
                let state = u32_at(data, 0).ok_or_else(|| errno(libc::EINVAL))?;
                backend.set_mig_state(state)?;
            }
            if argsz < 16 {
                return Err(errno(libc::EINVAL));
            }
            let mut r = header(16);
            r.extend_from_slice(&backend.mig_state()?.to_le_bytes());
            r.extend_from_slice(&(-1i32).to_le_bytes());
            Ok(r)
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START => {
            let page_size = u64_at(data, 0).ok_or_else(|| errno(libc::EINVAL))?;
            let n = u32_at(data, 8).ok_or_else(|| errno(libc::EINVAL))?;
            if n > MAX_LOGGING_RANGES || !page_size.is_power_of_two() {
                return Err(errno(libc::EINVAL));
            }
            let mut ranges = Vec::with_capacity(n as usize);
            for i in 0..n as usize {
                let iova = u64_at(data, 16 + 16 * i).ok_or_else(|| errno(libc::EINVAL))?;
                let len = u64_at(data, 24 + 16 * i).ok_or_else(|| errno(libc::EINVAL))?;
                if len == 0 || iova.checked_add(len).is_none() {
                    return Err(errno(libc::EINVAL));
                }
                ranges.push((iova, len));
            }
            let chosen = backend.dma_logging_start(page_size, &ranges)?;
            let mut r = header(8 + 16 + 16 * n as usize);
            r.extend_from_slice(&chosen.to_le_bytes());
            r.extend_from_slice(&data[8..16 + 16 * n as usize]);
            Ok(r)
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
            backend.dma_logging_stop()?;
            Ok(header(8))
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => {
            let iova = u64_at(data, 0).ok_or_else(|| errno(libc::EINVAL))?;
            let length = u64_at(data, 8).ok_or_else(|| errno(libc::EINVAL))?;
            let page_size = u64_at(data, 16).ok_or_else(|| errno(libc::EINVAL))?;
            if !page_size.is_power_of_two() || length == 0 || iova.checked_add(length).is_none() {
                return Err(errno(libc::EINVAL));
            }
            let words = length.div_ceil(page_size).div_ceil(64);
            let size = 8 + 24 + 8 * words;
            if size > argsz as u64 || size > max_reply as u64 {
                return Err(errno(libc::E2BIG));
            }
            let mut bitmap = vec![0u64; words as usize];
            backend.dma_logging_report(iova, length, page_size, &mut bitmap)?;
            let mut r = header(size as usize);
            r.extend_from_slice(&data[..24]);
            for w in bitmap {
                r.extend_from_slice(&w.to_le_bytes());
            }
            Ok(r)
        }
        _ => Err(errno(libc::ENOTSUP)),
    }
}

/// `VFIO_USER_IO_FD_TYPE_IOEVENTFD`.
pub const IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// `KVM_IOEVENTFD_FLAG_DATAMATCH`.
pub const IOEVENTFD_FLAG_DATAMATCH: u32 = 1;

/// One sub-region of `VFIO_USER_DEVICE_GET_REGION_IO_FDS`: writes to
/// `[offset, offset + size)` of the region signal `fd` (an eventfd) instead of reaching the
/// server as messages.
#[derive(Debug, Clone, Copy)]
pub struct IoEventFd {
    /// Offset in the region.
    pub offset: u64,
    /// Bytes (0: any access size).
    pub size: u64,
    /// The eventfd; the backend keeps it open.
    pub fd: std::os::fd::RawFd,
    /// `KVM_IOEVENTFD_FLAG_*` (only DATAMATCH is meaningful here).
    pub flags: u32,
    /// The value a write must carry with DATAMATCH.
    pub datamatch: u64,
}

/// `VFIO_USER_DEVICE_GET_REGION_IO_FDS`: `argsz`, `flags`, `index`, `count` in; the same with
/// `count` 40-byte sub-regions out, and their descriptors (each once).
pub(crate) fn region_io_fds(
    backend: &mut dyn ServerBackend,
    payload: &[u8],
    regions: usize,
) -> Result<(Vec<u8>, Vec<std::os::fd::RawFd>), io::Error> {
    let argsz = u32_at(payload, 0).ok_or_else(|| errno(libc::EINVAL))? as usize;
    let index = u32_at(payload, 8).ok_or_else(|| errno(libc::EINVAL))?;
    if index as usize >= regions || u32_at(payload, 4) != Some(0) {
        return Err(errno(libc::EINVAL));
    }
    let subs = backend.region_io_fds(index)?;
    let need = 16 + 40 * subs.len();
    let mut r = Vec::with_capacity(need);
    r.extend_from_slice(&(need as u32).to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&index.to_le_bytes());
    r.extend_from_slice(&(subs.len() as u32).to_le_bytes());
    let mut fds: Vec<std::os::fd::RawFd> = Vec::new();
    if argsz < need {
        // Too small for the array: the header says how much is needed.
        return Ok((r, fds));
    }
    for s in subs {
        let i = match fds.iter().position(|&f| f == s.fd) {
            Some(i) => i,
            None => {
                fds.push(s.fd);
                fds.len() - 1
            }
        };
        r.extend_from_slice(&s.offset.to_le_bytes());
        r.extend_from_slice(&s.size.to_le_bytes());
        r.extend_from_slice(&(i as u32).to_le_bytes());
        r.extend_from_slice(&IO_FD_TYPE_IOEVENTFD.to_le_bytes());
        r.extend_from_slice(&s.flags.to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        r.extend_from_slice(&s.datamatch.to_le_bytes());
    }
    Ok((r, fds))
}

/// `VFIO_USER_MIG_DATA_READ`: `argsz`, `size` in; `argsz`, `size`, data out.
pub(crate) fn mig_data_read(
    backend: &mut dyn ServerBackend,
    payload: &[u8],
    max_xfer: u32,
) -> Result<Vec<u8>, io::Error> {
    let size = u32_at(payload, 4).ok_or_else(|| errno(libc::EINVAL))?;
    if size > max_xfer {
        return Err(errno(libc::EINVAL));
    }
    let mut data = backend.mig_data_read(size)?;
    data.truncate(size as usize);
    let mut r = Vec::with_capacity(8 + data.len());
    r.extend_from_slice(&((8 + data.len()) as u32).to_le_bytes());
    r.extend_from_slice(&(data.len() as u32).to_le_bytes());
    r.extend_from_slice(&data);
    Ok(r)
}

/// `VFIO_USER_MIG_DATA_WRITE`: `argsz`, `size`, data in; nothing out.
pub(crate) fn mig_data_write(
    backend: &mut dyn ServerBackend,
    payload: &[u8],
) -> Result<Vec<u8>, io::Error> {
    let size = u32_at(payload, 4).ok_or_else(|| errno(libc::EINVAL))? as usize;
    let data = payload
        .get(8..8 + size)
        .ok_or_else(|| errno(libc::EINVAL))?;
    backend.mig_data_write(data)?;
    Ok(Vec::new())
}

/// Replies the client owes the server, by message ID.
#[derive(Default)]
pub(crate) struct Pending {
    waiting: HashMap<u16, SyncSender<Result<Vec<u8>, u32>>>,
    closed: bool,
}

/// The shared half of the connection: the socket for writing (whole messages under the
/// lock) and the replies awaited.
pub(crate) struct Channel {
    pub writer: Mutex<UnixStream>,
    pub pending: Mutex<Pending>,
    pub next_id: Mutex<u16>,
    pub client_xfer: u32,
}

impl Channel {
    /// Writes one whole message (and its file descriptors).
    pub fn send(&self, bytes: &[u8], fds: &[std::os::fd::RawFd]) -> Result<(), Error> {
        let w = lock(&self.writer);
        send_raw(&w, bytes, fds)
    }

    /// Hands a reply from the client to the thread that waits for it.
    pub fn deliver(&self, id: u16, reply: Result<Vec<u8>, u32>) {
        let tx = lock(&self.pending).waiting.remove(&id);
        match tx {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => warn!("reply {id} from the client answers nothing asked; dropped"),
        }
    }

    /// The connection ended: every waiting transfer fails.
    pub fn close(&self) {
        let mut p = lock(&self.pending);
        p.closed = true;
        p.waiting.clear();
    }
}

/// Server-to-client DMA on the main socket: `VFIO_USER_DMA_READ` and `VFIO_USER_DMA_WRITE`.
/// Cloneable; usable from any thread while the server loop runs (its own reader thread
/// delivers the replies). Each transfer is split at the client's `max_data_xfer_size`.
#[derive(Clone)]
pub struct DmaHandle {
    pub(crate) channel: Arc<Channel>,
    timeout: Duration,
}

impl DmaHandle {
    pub(crate) fn new(channel: Arc<Channel>) -> Self {
        Self {
            channel,
            timeout: Duration::from_secs(10),
        }
    }

    /// How long one message waits for the client's reply (10 s by default).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn call(&self, command: Command, body: &[u8]) -> Result<Vec<u8>, io::Error> {
        let (tx, rx): (_, Receiver<Result<Vec<u8>, u32>>) = sync_channel(1);
        let id = {
            let mut n = lock(&self.channel.next_id);
            let mut p = lock(&self.channel.pending);
            if p.closed {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the client is gone",
                ));
            }
            // IDs of this side's commands; skip any still awaited.
            let mut id = *n;
            while p.waiting.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            *n = id.wrapping_add(1);
            p.waiting.insert(id, tx);
            id
        };
        let header = Header {
            message_id: id,
            command: command as u16,
            message_size: (std::mem::size_of::<Header>() + body.len()) as u32,
            flags: HeaderFlags::Command as u32,
            error: 0,
        };
        let mut msg = header.as_slice().to_vec();
        msg.extend_from_slice(body);
        if let Err(e) = self.channel.send(&msg, &[]) {
            self.channel.deliver(id, Err(libc::EPIPE as u32));
            let _ = rx.try_recv();
            return Err(io::Error::other(e.to_string()));
        }
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(io::Error::from_raw_os_error(e as i32)),
            Err(_) => {
                lock(&self.channel.pending).waiting.remove(&id);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no reply to {command:?} within {:?}", self.timeout),
                ))
            }
        }
    }

    /// Reads `data.len()` bytes of client memory at DMA address `address`.
    ///
    /// # Errors
    /// The client's errno (`EFAULT`, `EPERM`, ... as it answers), a malformed reply
    /// (`EPROTO`), a timeout, or a closed connection.
    pub fn read(&self, address: u64, data: &mut [u8]) -> Result<(), io::Error> {
        let chunk = self.channel.client_xfer.max(1) as usize;
        for (k, part) in data.chunks_mut(chunk).enumerate() {
            let a = address + (k * chunk) as u64;
            let mut body = a.to_le_bytes().to_vec();
            body.extend_from_slice(&(part.len() as u64).to_le_bytes());
            let r = self.call(Command::DmaRead, &body)?;
            if r.len() != 16 + part.len()
                || u64_at(&r, 0) != Some(a)
                || u64_at(&r, 8) != Some(part.len() as u64)
            {
                return Err(errno(libc::EPROTO));
            }
            part.copy_from_slice(&r[16..]);
        }
        Ok(())
    }

    /// Writes `data` to client memory at DMA address `address`.
    ///
    /// # Errors
    /// As [`DmaHandle::read`].
    pub fn write(&self, address: u64, data: &[u8]) -> Result<(), io::Error> {
        let chunk = self.channel.client_xfer.max(1) as usize;
        for (k, part) in data.chunks(chunk).enumerate() {
            let a = address + (k * chunk) as u64;
            let mut body = a.to_le_bytes().to_vec();
            body.extend_from_slice(&(part.len() as u64).to_le_bytes());
            body.extend_from_slice(part);
            let r = self.call(Command::DmaWrite, &body)?;
            if r.len() < 12 || u64_at(&r, 0) != Some(a) {
                return Err(errno(libc::EPROTO));
            }
        }
        Ok(())
    }
}

/// One message from the client, read whole by the reader thread.
pub(crate) struct Message {
    pub header: Header,
    pub body: Vec<u8>,
    pub fds: Vec<std::fs::File>,
}

/// A reply being built: its bytes and the file descriptors to send with them.
#[derive(Default)]
pub(crate) struct Outbox {
    pub bytes: Vec<u8>,
    pub fds: Vec<std::os::fd::RawFd>,
}

impl Write for Outbox {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Channel {
    pub(crate) fn new(writer: UnixStream, client_xfer: u32) -> Self {
        Self {
            writer: Mutex::new(writer),
            pending: Mutex::new(Pending::default()),
            next_id: Mutex::new(0x8000),
            client_xfer,
        }
    }
}

/// Writes one whole message before the channel exists (the replies before VERSION).
pub(crate) fn send_raw(
    w: &UnixStream,
    bytes: &[u8],
    fds: &[std::os::fd::RawFd],
) -> Result<(), Error> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut w = w;
    if fds.is_empty() {
        w.write_all(bytes).map_err(Error::StreamWrite)
    } else {
        let sent = w.send_with_fds(&[bytes], fds).map_err(Error::SendWithFd)?;
        w.write_all(&bytes[sent..]).map_err(Error::StreamWrite)
    }
}

/// The reader thread: every message off the socket, commands to `tx` in order, replies to
/// their waiters. Ends at the client's hang-up or at a message that breaks the protocol (a
/// size below the header or above `max_message`), which ends the connection.
pub(crate) fn read_messages(
    mut stream: UnixStream,
    max_message: usize,
    tx: &SyncSender<Result<Message, Error>>,
    route: &Mutex<Option<Arc<Channel>>>,
) {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let hdr = std::mem::size_of::<Header>();
    loop {
        let mut header = Header::default();
        let mut fds = [0 as std::os::fd::RawFd; 16];
        let mut iov = [libc::iovec {
            iov_base: header.as_mut_slice().as_mut_ptr().cast(),
            iov_len: hdr,
        }];
        // SAFETY: the iovec points at `header`, alive and `hdr` bytes long; `fds` has room
        // for 16 descriptors.
        let r = unsafe { stream.recv_with_fds(&mut iov, &mut fds) };
        let (n, nfds) = match r {
            Ok(v) => v,
            Err(e) => {
                let _ = tx.send(Err(Error::ReceiveWithFd(e)));
                break;
            }
        };
        // SAFETY: the kernel installed `nfds` new descriptors, owned by nobody else.
        let files: Vec<std::fs::File> = fds[..nfds]
            .iter()
            .map(|&fd| unsafe { std::fs::File::from_raw_fd(fd) })
            .collect();
        if n == 0 {
            info!("Connection closed");
            break;
        }
        if n < hdr {
            let rest = &mut header.as_mut_slice()[n..];
            if let Err(e) = stream.read_exact(rest) {
                let _ = tx.send(Err(Error::StreamRead(e)));
                break;
            }
        }
        let size = header.message_size as usize;
        if size < hdr || size > max_message {
            let _ = tx.send(Err(Error::InvalidInput));
            break;
        }
        let mut body = vec![0u8; size - hdr];
        if let Err(e) = stream.read_exact(&mut body) {
            let _ = tx.send(Err(Error::StreamRead(e)));
            break;
        }
        if header.flags & 0xf == HeaderFlags::Reply as u32 {
            let c = lock(&route).clone();
            let reply = if header.flags & HeaderFlags::Error as u32 != 0 {
                Err(if header.error == 0 {
                    libc::EIO as u32
                } else {
                    header.error
                })
            } else {
                Ok(body)
            };
            match c {
                Some(c) => c.deliver(header.message_id, reply),
                None => warn!("a reply from the client before VERSION; dropped"),
            }
            continue;
        }
        if tx
            .send(Ok(Message {
                header,
                body,
                fds: files,
            }))
            .is_err()
        {
            break;
        }
    }
    if let Some(c) = lock(&route).as_ref() {
        c.close();
    }
}
