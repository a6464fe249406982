//! The receiving side: a migration stream from a socket, or a snapshot from a directory,
//! into a VM built from the same command line and not started yet.

use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use sync::{MutexExt, RwLockExt};
use vm_memory::{Bytes, GuestAddress};

use super::bounds::{self, Bounded, MAX_RAM_PASSES, MAX_ROUNDS};
use super::peer;
use super::send::Round;
use super::stream::{parse, Kind, StreamReader, StreamWriter};
use super::*;
use crate::config::{Address, TcpSecurity};
use crate::machine::devices::DeviceKind;
use crate::machine::{device_state, Machine, MachineConfig, MachineState, STATE_VERSION};
use ::devices::state::{FunctionState, Persist};

/// Where the guest comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Wait for a migration on this address.
    Listen(Address),
    /// A snapshot directory written by the `snapshot` command.
    Snapshot(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Listen(a) => write!(f, "{a}"),
            Source::Snapshot(d) => write!(f, "snapshot {}", d.display()),
        }
    }
}

/// The two directions of a connection (the read half takes timeouts).
type Halves = (Box<dyn Conn>, Box<dyn Write + Send>);

/// Waits on `addr` for a source this VMM admits (see [`peer`]): a peer that fails the uid
/// check or the TLS handshake is refused with a warning, and the wait goes on.
fn accept(addr: &Address) -> Result<Halves, MigrationError> {
    let err = |what: String| move |e| MigrationError::Transport(what, e);
    match addr {
        Address::Unix(p) => {
            // A stale socket from an earlier run would make bind fail; anything else at the
            // path is not ours to remove.
            if let Ok(meta) = std::fs::symlink_metadata(p) {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(MigrationError::Transport(
                        format!("cannot listen on {addr}: the path exists and is not a socket"),
                        std::io::ErrorKind::AlreadyExists.into(),
                    ));
                }
                let _ = std::fs::remove_file(p);
            }
            let l = std::os::unix::net::UnixListener::bind(p)
                .map_err(err(format!("cannot listen on {addr}")))?;
            log::info!("waiting for a migration on {addr}");
            let s = loop {
                let (s, _) = l.accept().map_err(err(format!("accept on {addr}")))?;
                match peer::check_uid(&s) {
                    Ok(()) => break s,
                    Err(why) => log::warn!("migration: refused a peer on {addr}: {why}"),
                }
            };
            let _ = std::fs::remove_file(p);
            let w = s.try_clone().map_err(err("socket".into()))?;
            Ok((Box::new(s), Box::new(w)))
        }
        Address::Tcp {
            host_port,
            security,
        } => {
            let tls = match security {
                TcpSecurity::Tls(t) => Some(peer::server_config(t).map_err(|e| {
                    MigrationError::Transport(format!("TLS for {addr}"), std::io::Error::other(e))
                })?),
                TcpSecurity::Insecure => {
                    log::warn!(
                        "migration on {addr} in clear text and unauthenticated (insecure): \
                         whoever reaches the port can send a guest"
                    );
                    None
                }
            };
            let l = std::net::TcpListener::bind(host_port.as_str())
                .map_err(err(format!("cannot listen on {addr}")))?;
            log::info!("waiting for a migration on {addr}");
            loop {
                let (s, from) = l.accept().map_err(err(format!("accept on {addr}")))?;
                let _ = s.set_nodelay(true);
                let Some(config) = &tls else {
                    let w = s.try_clone().map_err(err("socket".into()))?;
                    return Ok((Box::new(s), Box::new(w)));
                };
                match peer::Tls::accept(config.clone(), s) {
                    Ok(t) => {
                        log::info!("migration: {from} authenticated by TLS");
                        return Ok((Box::new(t.clone()), Box::new(t)));
                    }
                    Err(why) => log::warn!("migration: refused {from} on {addr}: {why}"),
                }
            }
        }
    }
}

/// How a destination waiting for the source's COMMIT is resolved by the user (the API's
/// `commit` or `discard`, with `--api-socket`): `wait(why)` shows `why` and returns whether
/// to run the guest.
pub trait HandoverResolver {
    /// Logs `why` once the user can see the pending decision (the API answers
    /// `awaiting-commit` from then on), then blocks until the user decides; `None` when
    /// nobody can (no API).
    fn wait(&self, why: &str) -> Option<bool>;
}

/// Receives the guest from `src` into `m` (built from the same command line, vCPUs not
/// running) and restores it. With a migration, the sender gets the verdict (and, when it
/// asked to verify, this side's RAM hashes); the guest is then only run once the sender
/// COMMITs. An ABORT discards it; a connection lost or silent before the COMMIT leaves the
/// decision to the user through `resolver`.
///
/// # Errors
/// [`MigrationError`]: a corrupt, truncated or incompatible stream, state that does not
/// fit this VM, a verify failure, an abort, or an unresolved hand-over.
pub fn receive(
    m: &Machine,
    vcpus: &[VcpuFd],
    src: &Source,
    resolver: &dyn HandoverResolver,
) -> Result<(), MigrationError> {
    let start = Instant::now();
    let (mut conn, mut ack): (Box<dyn Conn>, Option<Box<dyn Write + Send>>) = match src {
        Source::Listen(addr) => {
            let (r, w) = accept(addr)?;
            let total = test_fault("stream-ms").map_or(bounds::STREAM, Duration::from_millis);
            let r: Box<dyn Conn> = Box::new(Bounded::new(r, bounds::IDLE, total));
            (r, Some(w))
        }
        Source::Snapshot(dir) => {
            let path = dir.join("snapshot.vmm");
            let f = std::fs::File::open(&path).map_err(|e| {
                MigrationError::Transport(format!("cannot open {}", path.display()), e)
            })?;
            (Box::new(FileConn(f)), None)
        }
    };
    let mut reader = match StreamReader::new(BufReader::with_capacity(1 << 20, &mut conn)) {
        Ok(r) => r,
        Err(e) => return Err(answer(ack.as_mut(), Err(e.into()))),
    };
    let result = receive_stream(m, vcpus, &mut reader);
    let Some(w) = ack.as_mut() else {
        // A snapshot: verified against the hashes it carries.
        let mut incoming = result?;
        if incoming.handover.is_some_and(|h| h.verify) {
            let ours = match incoming.received_hashes.take() {
                Some(h) => h,
                None => ram_hashes(m)?,
            };
            let diff = differing_pages(&ours, &incoming.hashes, &m.devices.ram_ranges);
            if !diff.is_empty() {
                return Err(MigrationError::Verify(verify_failure(&diff)));
            }
            log::info!("verify: all {} RAM pages match the snapshot", ours.len());
        }
        log::info!(
            "restored the guest from {src} in {} ms",
            start.elapsed().as_millis()
        );
        return Ok(());
    };
    let mut incoming = match result {
        Ok(i) => i,
        Err(e) => return Err(answer(Some(w), Err(e))),
    };
    let handover = incoming.handover.unwrap_or(Handover {
        verify: false,
        timeout_ms: 30_000,
    });
    // The verdict, then (verifying) this side's hashes, on the way back.
    let mut back = StreamWriter::new(&mut **w)?;
    if let Some(ms) = test_fault("delay-ack") {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if test_fault("drop-ack").is_some() {
        log::warn!("test fault: not sending ACK");
    } else {
        let hashes = match (handover.verify, incoming.received_hashes.take()) {
            (false, _) => None,
            (true, Some(h)) => Some(h),
            (true, None) => Some(ram_hashes(m)?),
        };
        let sent = back
            .json(Kind::Ack, &serde_json::json!({"ok": true}))
            .and_then(|()| match &hashes {
                Some(h) => back.hashes(h),
                None => Ok(()),
            })
            .and_then(|()| back.flush());
        if let Err(e) = sent {
            log::warn!("cannot answer the migration source: {e}");
        }
        log::info!("migration: ACK sent; waiting for the source's COMMIT");
    }
    // Only a COMMIT lets the guest run here.
    reader
        .get_mut()
        .get_mut()
        .set_timeout(Some(Duration::from_millis(
            handover.timeout_ms.saturating_mul(2),
        )));
    let why = match reader.next_record() {
        Ok((Kind::Commit, _)) => {
            if test_fault("drop-done").is_some() {
                log::warn!("test fault: not sending DONE");
            } else if let Err(e) = back.record(Kind::Done, &[]).and_then(|()| back.flush()) {
                log::warn!("cannot confirm the COMMIT: {e}");
            }
            log::info!(
                "migration: committed; the guest runs here ({} ms after the connection)",
                start.elapsed().as_millis()
            );
            return Ok(());
        }
        Ok((Kind::Abort, payload)) => {
            let why = String::from_utf8_lossy(&payload).to_string();
            return Err(MigrationError::Aborted(why));
        }
        Ok((k, _)) => format!("the source sent {k:?} instead of COMMIT"),
        Err(e) => format!("no COMMIT from the source ({e})"),
    };
    let why = format!(
        "{why}: the source may have resumed the guest, or stopped for good. Ask it (status: \
         \"handover-unconfirmed\" means it stopped): then \"commit\" here to run the guest, \
         or \"discard\" here if the source runs it"
    );
    match resolver.wait(&why) {
        Some(true) => {
            log::info!("migration: committed through the API; the guest runs here");
            Ok(())
        }
        Some(false) => Err(MigrationError::Aborted("discarded through the API".into())),
        None => Err(MigrationError::Unconfirmed(format!(
            "{why} (no --api-socket to decide: the guest is not run)"
        ))),
    }
}

/// Sends the refusal `e` on the back channel (if any); returns `e`.
fn answer(w: Option<&mut Box<dyn Write + Send>>, e: Result<(), MigrationError>) -> MigrationError {
    let e = match e {
        Err(e) => e,
        Ok(()) => return state_err("no error"),
    };
    if let Some(w) = w {
        let verdict = serde_json::json!({"ok": false, "error": e.to_string()});
        let sent = StreamWriter::new(&mut **w)
            .and_then(|mut s| s.json(Kind::Ack, &verdict).and_then(|()| s.flush()));
        if let Err(e2) = sent {
            log::warn!("cannot answer the migration source: {e2}");
        }
    }
    e
}

/// A snapshot file as a connection (no timeouts).
struct FileConn(std::fs::File);

impl Read for FileConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for FileConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Conn for FileConn {
    fn set_timeout(&self, _: Option<Duration>) {}
}

fn receive_stream<R: Read>(
    m: &Machine,
    vcpus: &[VcpuFd],
    reader: &mut StreamReader<R>,
) -> Result<Incoming, MigrationError> {
    let incoming = read_stream_from(
        reader,
        &m.current_config(),
        &m.devices.ram_ranges,
        |gpa, bytes| {
            m.ram
                .mem
                .write_slice(bytes, GuestAddress(gpa))
                .map_err(|e| state_err(format!("writing guest RAM: {e}")))
        },
    )?;
    log::info!("received {} pages and the machine state", incoming.pages);
    let mut incoming = incoming;
    // Verifying: this side's RAM as the stream left it, hashed before the restore writes to
    // it (KVM refreshes the guest's kvmclock pages when the MSRs are restored, a new
    // back end may write ring flags): those writes are this side's, not losses.
    if incoming.handover.is_some_and(|h| h.verify) {
        incoming.received_hashes = Some(ram_hashes(m)?);
    }
    restore(m, vcpus, &incoming.state, &incoming.device_data)?;
    Ok(incoming)
}

/// What a stream carried besides guest RAM.
pub struct Incoming {
    /// The machine state (`STATE` record).
    pub state: MachineState,
    /// `(PCI slot, data)` of each passthrough device (`DEVICE_DATA` records).
    pub device_data: Vec<(u8, Vec<u8>)>,
    /// Guest pages received.
    pub pages: u64,
    /// The sender's hand-over options (`HANDOVER`), if it sent them.
    pub handover: Option<Handover>,
    /// RAM page hashes the stream carried (a snapshot taken with `verify`).
    pub hashes: Vec<u64>,
    /// Verifying: this side's RAM page hashes once every page arrived, before the restore.
    pub received_hashes: Option<Vec<u64>>,
}

/// Reads a whole stream (snapshot or migration) for a VM configured as `ours` with RAM
/// `ram_ranges` (`(GPA, bytes)`): checks the configuration, hands every `RAM` record's pages
/// to `write_ram(gpa, bytes)` (inside guest RAM, whole pages), and returns the rest. No KVM:
/// this is what a hostile stream meets first (`devices/fuzz`'s `migration_stream` target).
///
/// # Errors
/// [`MigrationError`]: a corrupt, truncated, foreign or incompatible stream, a record out of
/// place, pages outside guest RAM, no machine state, or `write_ram`'s error.
pub fn read_stream<R: Read>(
    reader: R,
    ours: &MachineConfig,
    ram_ranges: &[(u64, u64)],
    write_ram: impl FnMut(u64, &[u8]) -> Result<(), MigrationError>,
) -> Result<Incoming, MigrationError> {
    let mut r = StreamReader::new(reader)?;
    read_stream_from(&mut r, ours, ram_ranges, write_ram)
}

/// [`read_stream`] from a reader whose header was read; stops after `END`, so that the
/// hand-over can go on reading.
///
/// # Errors
/// As [`read_stream`].
pub fn read_stream_from<R: Read>(
    r: &mut StreamReader<R>,
    ours: &MachineConfig,
    ram_ranges: &[(u64, u64)],
    mut write_ram: impl FnMut(u64, &[u8]) -> Result<(), MigrationError>,
) -> Result<Incoming, MigrationError> {
    let (kind, payload) = r.next_record()?;
    if kind != Kind::Config {
        return Err(MigrationError::Incompatible(format!(
            "the stream starts with {kind:?}, not the machine configuration"
        )));
    }
    let theirs: MachineConfig = parse("Config", 0, &payload)?;
    check_config(&theirs, ours)?;
    let mut state: Option<MachineState> = None;
    let mut device_data: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut pages = 0u64;
    let mut handover = None;
    let mut hashes = Vec::new();
    let total_pages: u64 = ram_ranges.iter().map(|r| r.1 / 4096).sum();
    // What the source may send: this many RAM bytes, one DEVICE_DATA record per passthrough
    // function, at most MAX_ROUNDS rounds, one STATE and one HANDOVER.
    let ram_budget = total_pages
        .saturating_mul(4096)
        .saturating_mul(MAX_RAM_PASSES);
    let mut ram_bytes = 0u64;
    let mut rounds = 0u32;
    let passthrough: Vec<u8> = ours
        .functions
        .iter()
        .filter(|(_, k)| matches!(k, DeviceKind::VfioUser | DeviceKind::Vfio))
        .map(|&(slot, _)| slot)
        .collect();
    loop {
        let index = r.records();
        let (kind, payload) = r.next_record()?;
        match kind {
            Kind::Ram => {
                if payload.len() < 8 || (payload.len() - 8) % 4096 != 0 {
                    return Err(bad(index, "Ram", "not whole pages"));
                }
                let gpa = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                let len = (payload.len() - 8) as u64;
                let inside = ram_ranges.iter().any(|&(s, l)| {
                    gpa >= s
                        && gpa
                            .checked_add(len)
                            .is_some_and(|e| s.checked_add(l).is_some_and(|end| e <= end))
                });
                if gpa % 4096 != 0 || !inside {
                    return Err(bad(
                        index,
                        "Ram",
                        &format!("pages at {gpa:#x}+{len:#x} are not guest RAM"),
                    ));
                }
                ram_bytes = ram_bytes.saturating_add(len);
                if ram_bytes > ram_budget {
                    return Err(bad(
                        index,
                        "Ram",
                        &format!(
                            "more than {MAX_RAM_PASSES} passes over the guest's \
                             {total_pages} pages of RAM"
                        ),
                    ));
                }
                write_ram(gpa, &payload[8..])?;
                pages += len / 4096;
            }
            Kind::Round => {
                rounds += 1;
                if rounds > MAX_ROUNDS + 1 {
                    return Err(bad(
                        index,
                        "Round",
                        &format!("more than {MAX_ROUNDS} pre-copy rounds"),
                    ));
                }
                if let Ok(round) = parse::<Round>("Round", index, &payload) {
                    log::info!(
                        "migration: received round {} ({} pages, {} dirty after it)",
                        round.round,
                        round.pages,
                        round.dirty_after
                    );
                }
            }
            Kind::DeviceData => {
                if payload.len() < 4 {
                    return Err(bad(index, "DeviceData", "no slot"));
                }
                let slot = u32::from_le_bytes(payload[..4].try_into().unwrap_or_default());
                let slot = u8::try_from(slot)
                    .ok()
                    .filter(|s| passthrough.contains(s))
                    .ok_or_else(|| {
                        bad(
                            index,
                            "DeviceData",
                            &format!("slot {slot} is not a passthrough device of this VM"),
                        )
                    })?;
                if device_data.iter().any(|(s, _)| *s == slot) {
                    return Err(bad(
                        index,
                        "DeviceData",
                        &format!("a second record for slot {slot}"),
                    ));
                }
                device_data.push((slot, payload[4..].to_vec()));
            }
            Kind::State => {
                // The version first: an older state is refused by name, not by whichever of
                // its fields no longer parses.
                let v: StateVersion = parse("State", index, &payload)?;
                if v.version != STATE_VERSION {
                    return Err(MigrationError::Incompatible(format!(
                        "machine state version {} (this VMM reads {STATE_VERSION}: take the \
                         snapshot again, or migrate between VMMs of one version)",
                        v.version
                    )));
                }
                if state.is_some() {
                    return Err(bad(index, "State", "a second machine state"));
                }
                state = Some(parse("State", index, &payload)?)
            }
            Kind::Handover if handover.is_some() => {
                return Err(bad(index, "Handover", "a second hand-over record"));
            }
            Kind::Handover => handover = Some(parse("Handover", index, &payload)?),
            Kind::Hashes => stream::add_hashes(&mut hashes, &payload, total_pages, index)?,
            Kind::End => break,
            Kind::Config | Kind::Ack | Kind::Commit | Kind::Abort | Kind::Done => {
                return Err(bad(index, &format!("{kind:?}"), "unexpected record"));
            }
        }
    }
    let state = state.ok_or_else(|| state_err("the stream has no machine state"))?;
    Ok(Incoming {
        state,
        device_data,
        pages,
        handover,
        hashes,
        received_hashes: None,
    })
}

/// The version of a `State` record, read before the rest of it.
#[derive(serde::Deserialize)]
struct StateVersion {
    version: u32,
}

fn bad(index: u64, kind: &str, what: &str) -> MigrationError {
    MigrationError::Stream(stream::StreamError::BadRecord {
        index,
        kind: kind.to_string(),
        what: what.to_string(),
    })
}

fn check_config(theirs: &MachineConfig, ours: &MachineConfig) -> Result<(), MigrationError> {
    if theirs.memory != ours.memory {
        return Err(MigrationError::Incompatible(format!(
            "the guest has {} MiB of RAM, this VM {} MiB (start it with the same --memory)",
            theirs.memory >> 20,
            ours.memory >> 20
        )));
    }
    if theirs.cpus != ours.cpus {
        return Err(MigrationError::Incompatible(format!(
            "the guest has {} vCPUs, this VM {}",
            theirs.cpus, ours.cpus
        )));
    }
    if theirs.functions != ours.functions {
        let show = |f: &[(u8, DeviceKind)]| {
            f.iter()
                .map(|(s, k)| format!("00:{s:02x}.0 {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(MigrationError::Incompatible(format!(
            "the guest's PCI devices are [{}], this VM's [{}] (start it with the same \
             device flags)",
            show(&theirs.functions),
            show(&ours.functions)
        )));
    }
    Ok(())
}

fn restore(
    m: &Machine,
    vcpus: &[VcpuFd],
    st: &MachineState,
    device_data: &[(u8, Vec<u8>)],
) -> Result<(), MigrationError> {
    if st.version != STATE_VERSION {
        return Err(MigrationError::Incompatible(format!(
            "machine state version {} (this VMM reads {STATE_VERSION})",
            st.version
        )));
    }
    if st.vcpus.len() != vcpus.len() {
        return Err(MigrationError::Incompatible(format!(
            "{} vCPU states for {} vCPUs",
            st.vcpus.len(),
            vcpus.len()
        )));
    }
    st.vm.restore(&m.vm_fd).map_err(state_err)?;
    for (i, (s, v)) in st.vcpus.iter().zip(vcpus).enumerate() {
        s.restore(v, m.ctx.xsave_size)
            .map_err(|e| state_err(format!("vCPU {i}: {e}")))?;
    }
    Persist::restore(&mut *m.serial.locked(), &st.serial).map_err(state_err)?;
    // The virtio-iommu's function, then its tables, then the other functions: devices behind
    // it that restart (virtio queues checked through it, a vhost-user back end's rings and
    // IOTLB misses) translate through the restored tables, which the function's own restore
    // (a device reset first) would otherwise clear.
    let restore_function = |slot: u8, value: &FunctionState| {
        let functions = m.devices.functions.read_locked();
        let Some(f) = functions.iter().find(|f| f.slot == slot) else {
            return Err(MigrationError::Incompatible(format!(
                "no PCI function at 00:{slot:02x}.0"
            )));
        };
        let r = f
            .device
            .locked()
            .restore_state(value)
            .map_err(|e| state_err(format!("{}: {e}", f.name)));
        r
    };
    let is_iommu = |slot: u8| {
        m.devices
            .functions
            .read_locked()
            .iter()
            .any(|f| f.slot == slot && f.kind == DeviceKind::VirtioIommu)
    };
    for (slot, value) in st.functions.iter().filter(|f| is_iommu(f.0)) {
        restore_function(*slot, value)?;
    }
    match (&m.devices.iommu, &st.viommu) {
        (Some((h, _)), Some(v)) => h.lock().restore_state(v).map_err(state_err)?,
        (None, None) => {}
        _ => {
            return Err(MigrationError::Incompatible(
                "virtio-iommu presence differs".into(),
            ))
        }
    }
    for (slot, value) in st.functions.iter().filter(|f| !is_iommu(f.0)) {
        restore_function(*slot, value)?;
    }
    m.devices.pci.refresh_all();
    for p in m.devices.passthrough.read_locked().iter() {
        let Some((_, data)) = device_data.iter().find(|d| d.0 == p.slot) else {
            return Err(MigrationError::Incompatible(format!(
                "no device data for {}",
                p.label
            )));
        };
        let mut b = p.backend.locked();
        let err =
            |e: devices::passthrough::PassthroughError| state_err(format!("{}: {e}", p.label));
        b.set_migration_state(device_state::STOP).map_err(err)?;
        b.set_migration_state(device_state::RESUMING).map_err(err)?;
        b.write_migration_data(data).map_err(err)?;
        b.set_migration_state(device_state::STOP).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
