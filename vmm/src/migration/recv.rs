//! The receiving side: a migration stream from a socket, or a snapshot from a directory,
//! into a VM built from the same command line and not started yet.

use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::send::Round;
use super::stream::{parse, Kind, StreamReader, StreamWriter};
use super::*;

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

/// The two directions of a connection.
type Halves = (Box<dyn Read + Send>, Box<dyn Write + Send>);

fn accept(addr: &Address) -> Result<Halves, MigrationError> {
    let err = |what: String| move |e| MigrationError::Transport(what, e);
    match addr {
        Address::Unix(p) => {
            // A stale socket file from an earlier run would make bind fail.
            if p.exists() {
                let _ = std::fs::remove_file(p);
            }
            let l = std::os::unix::net::UnixListener::bind(p)
                .map_err(err(format!("cannot listen on {addr}")))?;
            log::info!("waiting for a migration on {addr}");
            let (s, _) = l.accept().map_err(err(format!("accept on {addr}")))?;
            let _ = std::fs::remove_file(p);
            let w = s.try_clone().map_err(err("socket".into()))?;
            Ok((Box::new(s), Box::new(w)))
        }
        Address::Tcp(hp) => {
            let l = std::net::TcpListener::bind(hp.as_str())
                .map_err(err(format!("cannot listen on {addr}")))?;
            log::info!("waiting for a migration on {addr}");
            let (s, _) = l.accept().map_err(err(format!("accept on {addr}")))?;
            let _ = s.set_nodelay(true);
            let w = s.try_clone().map_err(err("socket".into()))?;
            Ok((Box::new(s), Box::new(w)))
        }
    }
}

/// Receives the guest from `src` into `m` (built from the same command line, vCPUs not
/// running) and restores it. With a migration, the sender gets the verdict.
///
/// # Errors
/// [`MigrationError`]: a corrupt, truncated or incompatible stream, or state that does not
/// fit this VM.
pub fn receive(m: &Machine, vcpus: &[VcpuFd], src: &Source) -> Result<(), MigrationError> {
    let start = Instant::now();
    let (reader, mut ack): (Box<dyn Read + Send>, Option<Box<dyn Write + Send>>) = match src {
        Source::Listen(addr) => {
            let (r, w) = accept(addr)?;
            (r, Some(w))
        }
        Source::Snapshot(dir) => {
            let path = dir.join("snapshot.vmm");
            let f = std::fs::File::open(&path).map_err(|e| {
                MigrationError::Transport(format!("cannot open {}", path.display()), e)
            })?;
            (Box::new(f), None)
        }
    };
    let result = receive_stream(m, vcpus, reader);
    if let Some(w) = ack.as_mut() {
        let verdict = match &result {
            Ok(()) => serde_json::json!({"ok": true}),
            Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
        };
        let sent = StreamWriter::new(&mut *w)
            .and_then(|mut s| s.json(Kind::Ack, &verdict).and_then(|()| s.flush()));
        if let Err(e) = sent {
            log::warn!("cannot answer the migration source: {e}");
        }
    }
    if result.is_ok() {
        log::info!(
            "restored the guest from {src} in {} ms",
            start.elapsed().as_millis()
        );
    }
    result
}

fn receive_stream(
    m: &Machine,
    vcpus: &[VcpuFd],
    reader: Box<dyn Read + Send>,
) -> Result<(), MigrationError> {
    let mut r = StreamReader::new(BufReader::with_capacity(1 << 20, reader))?;
    let (kind, payload) = r.next()?;
    if kind != Kind::Config {
        return Err(MigrationError::Incompatible(format!(
            "the stream starts with {kind:?}, not the machine configuration"
        )));
    }
    let theirs: MachineConfig = parse("Config", 0, &payload)?;
    check_config(&theirs, &m.config)?;
    let mut state: Option<MachineState> = None;
    let mut device_data: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut pages = 0u64;
    loop {
        let index = r.records();
        let (kind, payload) = r.next()?;
        match kind {
            Kind::Ram => {
                if payload.len() < 8 || (payload.len() - 8) % 4096 != 0 {
                    return Err(bad(index, "Ram", "not whole pages"));
                }
                let gpa = u64::from_le_bytes(payload[..8].try_into().unwrap_or_default());
                let len = (payload.len() - 8) as u64;
                let inside =
                    m.devices.ram_ranges.iter().any(|&(s, l)| {
                        gpa >= s && gpa.checked_add(len).is_some_and(|e| e <= s + l)
                    });
                if gpa % 4096 != 0 || !inside {
                    return Err(bad(
                        index,
                        "Ram",
                        &format!("pages at {gpa:#x}+{len:#x} are not guest RAM"),
                    ));
                }
                m.ram
                    .mem
                    .write_slice(&payload[8..], GuestAddress(gpa))
                    .map_err(|e| state_err(format!("writing guest RAM: {e}")))?;
                pages += len / 4096;
            }
            Kind::Round => {
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
                let slot = u8::try_from(slot).map_err(|_| bad(index, "DeviceData", "bad slot"))?;
                device_data.push((slot, payload[4..].to_vec()));
            }
            Kind::State => state = Some(parse("State", index, &payload)?),
            Kind::End => break,
            Kind::Config | Kind::Ack => {
                return Err(bad(index, &format!("{kind:?}"), "unexpected record"));
            }
        }
    }
    let state = state.ok_or_else(|| state_err("the stream has no machine state"))?;
    log::info!("received {pages} pages and the machine state");
    restore(m, vcpus, &state, &device_data)
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
        let show = |f: &[(u8, String)]| {
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
        s.restore(v)
            .map_err(|e| state_err(format!("vCPU {i}: {e}")))?;
    }
    m.serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .restore_state(&st.serial)
        .map_err(state_err)?;
    for (slot, value) in &st.functions {
        let Some((_, name, dev)) = m.devices.functions.iter().find(|f| f.0 == *slot) else {
            return Err(MigrationError::Incompatible(format!(
                "no PCI function at 00:{slot:02x}.0"
            )));
        };
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(value)
            .map_err(|e| state_err(format!("{name}: {e}")))?;
    }
    m.devices.pci.refresh_all();
    match (&m.devices.iommu, &st.viommu) {
        (Some((h, _)), Some(v)) => h.lock().restore_state(v).map_err(state_err)?,
        (None, None) => {}
        _ => {
            return Err(MigrationError::Incompatible(
                "virtio-iommu presence differs".into(),
            ))
        }
    }
    for p in &m.devices.passthrough {
        let slot = super::send::slot_of(m, &p.label);
        let Some((_, data)) = device_data.iter().find(|d| d.0 == slot) else {
            return Err(MigrationError::Incompatible(format!(
                "no device data for {}",
                p.label
            )));
        };
        let mut b = p.backend.lock().unwrap_or_else(|e| e.into_inner());
        let err =
            |e: devices::passthrough::PassthroughError| state_err(format!("{}: {e}", p.label));
        b.set_migration_state(device_state::STOP).map_err(err)?;
        b.set_migration_state(device_state::RESUMING).map_err(err)?;
        b.write_migration_data(data).map_err(err)?;
        b.set_migration_state(device_state::STOP).map_err(err)?;
    }
    Ok(())
}
