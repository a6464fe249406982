//! The sending side: pre-copy rounds, stop-and-copy, and snapshots.

use std::io::Write;
use std::time::{Duration, Instant};

use iommu::dirty::DirtyBitmap;
use serde::{Deserialize, Serialize};
use sync::{MutexExt, RwLockExt};
use vm_memory::{Bytes, GuestAddress};

use super::bounds::MAX_ROUNDS;
use super::peer;
use super::stream::{Kind, StreamReader, StreamWriter, MAX_RAM_RECORD};
use super::*;
use crate::config::{Address, TcpSecurity};
use crate::machine::{
    device_state, DirtySources, Lifecycle, Machine, MigrationPhase, ProgressState,
};

/// Knobs of a migration (the API's `migrate` arguments).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrateOptions {
    /// Destination: `unix:PATH`, `tcp:HOST:PORT,tls=DIR[,tls-hostname=NAME]` or
    /// `tcp:HOST:PORT,insecure` ([`crate::config::Address`]).
    pub to: String,
    /// Most pre-copy rounds after the first full copy.
    pub max_rounds: u32,
    /// Stop and copy once at most this many pages are dirty.
    pub max_dirty_pages: u64,
    /// Harvest passthrough devices' dirty pages. Turning this off is unsafe (device writes
    /// during migration are lost); it exists to show that they would be.
    pub device_dirty_tracking: bool,
    /// After the last copy, compare every RAM page of both sides (by hash) before the guest
    /// runs again; a difference fails the migration (the guest resumes here).
    pub verify: bool,
    /// Milliseconds each side waits for the other during the hand-over.
    pub timeout_ms: u64,
    /// Most bytes per second the pre-copy rounds send (0: no limit). Like QEMU's
    /// `max-bandwidth`, it leaves the stop-and-copy phase alone: the guest is paused then.
    pub max_bandwidth: u64,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            to: String::new(),
            max_rounds: 30,
            max_dirty_pages: 256,
            device_dirty_tracking: true,
            verify: false,
            timeout_ms: 30_000,
            max_bandwidth: 0,
        }
    }
}

/// One pre-copy round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    /// 0 is the full copy.
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Milliseconds it took.
    pub ms: u64,
    /// Pages found dirty at its end.
    pub dirty_after: u64,
    /// Milliseconds the harvest at its end took.
    pub harvest_ms: f64,
    /// What each dirty source reported in that harvest.
    #[serde(default)]
    pub dirty_by_source: DirtySources,
}

impl Round {
    /// Pages dirtied per second during this round: the pages dirty at its end over its
    /// milliseconds (the count itself for a round shorter than a millisecond).
    pub fn dirty_rate(&self) -> u64 {
        (self.dirty_after * 1000)
            .checked_div(self.ms)
            .unwrap_or(self.dirty_after)
    }

    /// Milliseconds a stop-and-copy of the pages this round left dirty would take, at this
    /// round's milliseconds per page sent, plus 5 ms for the device and machine state.
    pub fn expected_downtime_ms(&self) -> f64 {
        let per_page_ms = if self.pages > 0 {
            self.ms as f64 / self.pages as f64
        } else {
            0.0
        };
        self.dirty_after as f64 * per_page_ms + 5.0
    }
}

/// What a finished migration or snapshot reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Pre-copy rounds (empty for a snapshot).
    pub rounds: Vec<Round>,
    /// Pages sent in the stop-and-copy phase.
    pub final_pages: u64,
    /// Milliseconds the guest was paused.
    pub downtime_ms: u64,
    /// Milliseconds from start to end.
    pub total_ms: u64,
    /// Pages sent in all.
    pub pages: u64,
    /// Stream bytes.
    pub bytes: u64,
    /// Passthrough devices that could not report their dirty pages.
    pub untracked_devices: Vec<String>,
    /// RAM pages found identical on both sides (0 without `verify`).
    pub verified_pages: u64,
    /// Dirty pages each source reported, over every harvest.
    pub dirty_by_source: DirtySources,
    /// What each source reported in the last harvest (the stop-and-copy).
    pub final_by_source: DirtySources,
    /// Dirty reports read from passthrough devices during the migration.
    pub device_dirty_reads: u64,
}

/// Paces a sender to `bytes_per_s` (0: no limit).
struct Pace {
    bytes_per_s: u64,
    start: Instant,
    bytes: u64,
}

impl Pace {
    fn new(bytes_per_s: u64) -> Pace {
        Pace {
            bytes_per_s,
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Counts `n` more bytes sent; sleeps while the sender is ahead of the limit.
    fn sent(&mut self, n: u64) {
        self.bytes += n;
        if let Some(wait) = ahead_by(self.bytes, self.bytes_per_s, self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// How far ahead of `bytes_per_s` a sender is that sent `bytes` in `elapsed` (`None`: not
/// ahead, or no limit).
fn ahead_by(bytes: u64, bytes_per_s: u64, elapsed: Duration) -> Option<Duration> {
    if bytes_per_s == 0 {
        return None;
    }
    let due = Duration::from_secs_f64(bytes as f64 / bytes_per_s as f64);
    due.checked_sub(elapsed).filter(|d| !d.is_zero())
}

/// Sends every page of `pages` (or all RAM when `None`) at most at `pace`; returns the count.
fn send_pages<W: Write>(
    m: &Machine,
    w: &mut StreamWriter<W>,
    pages: Option<&DirtyBitmap>,
    pace: &mut Pace,
) -> Result<u64, MigrationError> {
    let mut runs = Vec::new();
    match pages {
        Some(b) => b.for_each_run(|gpa, len| runs.push((gpa, len))),
        None => runs = m.ram.data_extents(),
    }
    let mut sent = 0;
    let mut buf = vec![0u8; MAX_RAM_RECORD as usize];
    for (gpa, len) in runs {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(MAX_RAM_RECORD);
            let chunk = &mut buf[..n as usize];
            m.ram
                .mem
                .read_slice(chunk, GuestAddress(gpa + off))
                .map_err(|e| state_err(format!("reading guest RAM at {:#x}: {e}", gpa + off)))?;
            w.record(Kind::Ram, &[&(gpa + off).to_le_bytes(), chunk])?;
            pace.sent(n);
            sent += n / 4096;
            m.progress
                .pages_sent
                .fetch_add(n / 4096, std::sync::atomic::Ordering::Relaxed);
            off += n;
        }
    }
    Ok(sent)
}

/// Connects to the destination at `to` and checks it (see [`peer`]).
fn connect(to: &str) -> Result<Box<dyn Conn>, MigrationError> {
    let addr: Address = to.parse().map_err(MigrationError::Busy)?;
    let failed = |e| MigrationError::Transport(format!("cannot connect to {addr}"), e);
    let refused = |why: String| {
        MigrationError::Transport(
            format!("refused the destination {addr}"),
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
        )
    };
    match &addr {
        Address::Unix(p) => {
            let s = std::os::unix::net::UnixStream::connect(p).map_err(failed)?;
            peer::check_uid(&s).map_err(refused)?;
            Ok(Box::new(s))
        }
        Address::Tcp {
            host_port,
            security,
        } => {
            let config = match security {
                TcpSecurity::Tls(t) => Some((
                    peer::client_config(t).map_err(refused)?,
                    t.hostname
                        .clone()
                        .or_else(|| addr.host().map(str::to_string))
                        .unwrap_or_default(),
                )),
                TcpSecurity::Insecure => {
                    log::warn!("migrating to {addr} in clear text and unauthenticated (insecure)");
                    None
                }
            };
            let s = std::net::TcpStream::connect(host_port.as_str()).map_err(failed)?;
            let _ = s.set_nodelay(true);
            match config {
                None => Ok(Box::new(s)),
                Some((config, name)) => Ok(Box::new(
                    peer::Tls::connect(config, &name, s).map_err(refused)?,
                )),
            }
        }
    }
}

/// Stops everything that changes guest state: vCPUs parked, device queues frozen,
/// passthrough devices in STOP (their transfers parked between chunks), vhost-user back
/// ends' rings stopped (`GET_VRING_BASE`).
fn quiesce(m: &Machine) -> Result<(), MigrationError> {
    m.pause_vcpus()?;
    m.freeze();
    let stopped = m
        .passthrough_state(device_state::STOP)
        .and_then(|()| m.stop_vhost_user());
    if let Err(e) = stopped {
        m.thaw();
        let _ = m.passthrough_state(device_state::RUNNING);
        return Err(e.into());
    }
    Ok(())
}

/// Undoes [`quiesce`] (after a failed migration, or a snapshot).
fn unquiesce(m: &Machine, keep_paused: bool) {
    if let Err(e) = m.passthrough_state(device_state::RUNNING) {
        log::error!("cannot restart a passthrough device: {e}");
    }
    m.restart_vhost_user();
    m.thaw();
    if !keep_paused {
        m.resume_vcpus();
    }
}

/// Writes the stop-and-copy part: device data, then the machine state, then END.
fn send_final_state<W: Write>(m: &Machine, w: &mut StreamWriter<W>) -> Result<(), MigrationError> {
    for p in m.devices.passthrough.read_locked().iter() {
        let mut b = p.backend.locked();
        b.set_migration_state(device_state::STOP_COPY)
            .map_err(|e| state_err(format!("{}: {e}", p.label)))?;
        let data = b.read_migration_data();
        let back = b.set_migration_state(device_state::STOP);
        let data = data.map_err(|e| state_err(format!("{}: {e}", p.label)))?;
        back.map_err(|e| state_err(format!("{}: {e}", p.label)))?;
        w.record(Kind::DeviceData, &[&u32::from(p.slot).to_le_bytes(), &data])?;
    }
    let st = m.save_state()?;
    w.json(Kind::State, &st)?;
    w.record(Kind::End, &[])?;
    w.flush()?;
    Ok(())
}

/// Migrates the running guest to `opts.to`. On success the guest runs there and this VMM
/// ends; on failure the guest keeps running here.
///
/// # Errors
/// [`MigrationError`].
pub fn migrate(m: &Machine, opts: &MigrateOptions) -> Result<MigrationReport, MigrationError> {
    let _busy = m
        .busy
        .try_lock()
        .map_err(|_| MigrationError::Busy("a snapshot or migration is in progress".into()))?;
    if *m.lifecycle.locked() == Lifecycle::Paused {
        return Err(MigrationError::Busy(
            "the VM is paused; resume it first (or take a snapshot)".into(),
        ));
    }
    if opts.max_rounds > MAX_ROUNDS {
        return Err(MigrationError::Busy(format!(
            "max_rounds {} is more than {MAX_ROUNDS}, the most a destination accepts",
            opts.max_rounds
        )));
    }
    m.check_migratable()?;
    let start = Instant::now();
    let conn = connect(&opts.to)?;
    let mut w = StreamWriter::new(std::io::BufWriter::with_capacity(1 << 20, conn))?;
    w.json(Kind::Config, &m.current_config())?;
    w.json(
        Kind::Handover,
        &Handover {
            verify: opts.verify,
            timeout_ms: opts.timeout_ms,
        },
    )?;

    let mut report = MigrationReport {
        untracked_devices: m.start_tracking(opts.device_dirty_tracking)?,
        ..Default::default()
    };
    let downtime_start = match precopy_and_stop(m, opts, &mut w, &mut report, start) {
        Ok(t) => t,
        Err((e, quiesced)) => {
            // A destination that refuses says why before it hangs up.
            let e = match e {
                MigrationError::Stream(stream::StreamError::Io(_)) => {
                    refusal(w.get_mut().get_mut()).unwrap_or(e)
                }
                e => e,
            };
            log::error!("migration failed: {e}; the guest keeps running here");
            m.progress.set(None);
            m.stop_tracking();
            if quiesced {
                unquiesce(m, false);
            }
            return Err(e);
        }
    };
    m.progress.update(|p| p.phase = MigrationPhase::HandOver);
    let outcome = hand_over(m, opts, &mut w, &mut report);
    m.progress.set(None);
    match outcome {
        Ok(()) => {
            report.downtime_ms = downtime_start.elapsed().as_millis() as u64;
            report.total_ms = start.elapsed().as_millis() as u64;
            report.bytes = w.bytes;
            log::info!(
                "migration to {} done: {} pages in {} ms, downtime {} ms",
                opts.to,
                report.pages,
                report.total_ms,
                report.downtime_ms
            );
            // The caller ends the VM (`ExitReason::Migrated`) once it has answered: ending it
            // here could end the process before the report reaches the user.
            Ok(report)
        }
        Err(HandOver::Resume(e)) => {
            log::error!("migration failed: {e}; the guest keeps running here");
            let reason = serde_json::json!({"error": e.to_string()});
            let _ = w.json(Kind::Abort, &reason).and_then(|()| w.flush());
            m.stop_tracking();
            unquiesce(m, false);
            Err(e)
        }
        Err(HandOver::Unconfirmed(e)) => {
            log::error!("migration: {e}; the guest stays stopped here");
            m.stop_tracking();
            *m.lifecycle.locked() = Lifecycle::HandoverUnconfirmed;
            Err(e)
        }
    }
}

/// How a hand-over failed.
enum HandOver {
    /// Before COMMIT: the guest resumes here (the destination discards it on ABORT).
    Resume(MigrationError),
    /// After COMMIT, unconfirmed: the guest may run there; it stays stopped here.
    Unconfirmed(MigrationError),
}

/// The fenced hand-over once the destination has everything: its ACK (and, verifying, its
/// RAM hashes, compared with ours), then COMMIT, then its DONE.
fn hand_over(
    m: &Machine,
    opts: &MigrateOptions,
    w: &mut StreamWriter<std::io::BufWriter<Box<dyn Conn>>>,
    report: &mut MigrationReport,
) -> Result<(), HandOver> {
    let resume = |e: MigrationError| HandOver::Resume(e);
    let ram = &m.devices.ram_ranges;
    w.flush().map_err(|e| resume(e.into()))?;
    let ours = if opts.verify {
        Some(ram_hashes(m).map_err(resume)?)
    } else {
        None
    };
    let conn = w.get_mut().get_mut();
    conn.set_timeout(Some(Duration::from_millis(opts.timeout_ms)));
    let mut back = StreamReader::new(&mut *conn).map_err(|e| resume(no_ack(e)))?;
    match back.next_record() {
        Ok((Kind::Ack, payload)) => {
            let v: serde_json::Value =
                serde_json::from_slice(&payload).unwrap_or(serde_json::Value::Null);
            if v.get("ok").and_then(|o| o.as_bool()) != Some(true) {
                return Err(resume(MigrationError::Refused(
                    v.get("error")
                        .and_then(|e| e.as_str())
                        .unwrap_or("no reason given")
                        .to_string(),
                )));
            }
        }
        Ok((k, _)) => {
            return Err(resume(MigrationError::Refused(format!(
                "unexpected {k:?} record"
            ))))
        }
        Err(e) => return Err(resume(no_ack(e))),
    }
    if let Some(ours) = &ours {
        let mut theirs = Vec::with_capacity(ours.len());
        while theirs.len() < ours.len() {
            let index = back.records();
            match back.next_record() {
                Ok((Kind::Hashes, payload)) => {
                    stream::add_hashes(&mut theirs, &payload, ours.len() as u64, index)
                        .map_err(|e| resume(e.into()))?
                }
                Ok((k, _)) => {
                    return Err(resume(MigrationError::Verify(format!(
                        "the destination sent {k:?} instead of its RAM hashes"
                    ))))
                }
                Err(e) => return Err(resume(MigrationError::Verify(format!("{e}")))),
            }
        }
        let diff = differing_pages(ours, &theirs, ram);
        if !diff.is_empty() {
            return Err(resume(MigrationError::Verify(verify_failure(&diff))));
        }
        report.verified_pages = ours.len() as u64;
        log::info!("verify: all {} RAM pages match", ours.len());
    }
    let index = back.records();
    if let Some(ms) = test_fault("stall-before-commit") {
        log::warn!("test fault: ACK received; committing in {ms} ms");
        std::thread::sleep(Duration::from_millis(ms));
    }
    // From here on the guest may run there: it never resumes here on its own.
    if test_fault("drop-commit").is_some() {
        log::warn!("test fault: not sending COMMIT");
    } else if let Err(e) = w.record(Kind::Commit, &[]).and_then(|()| w.flush()) {
        return Err(HandOver::Unconfirmed(MigrationError::Unconfirmed(format!(
            "COMMIT could not be sent ({e})"
        ))));
    }
    let conn = w.get_mut().get_mut();
    let mut back = StreamReader::resume(&mut *conn, index);
    match back.next_record() {
        Ok((Kind::Done, _)) => Ok(()),
        Ok((k, _)) => Err(HandOver::Unconfirmed(MigrationError::Unconfirmed(format!(
            "the destination sent {k:?} instead of DONE"
        )))),
        Err(e) => Err(HandOver::Unconfirmed(MigrationError::Unconfirmed(format!(
            "no DONE from the destination ({e})"
        )))),
    }
}

/// The error for an ACK that did not come.
fn no_ack(e: stream::StreamError) -> MigrationError {
    MigrationError::Refused(format!("no ACK from the destination ({e})"))
}

/// Resumes a guest whose hand-over was not confirmed (the user forced it).
pub fn resume_after_handover(m: &Machine) {
    unquiesce(m, false);
}

/// The destination's refusal, if it sent one.
fn refusal(conn: &mut Box<dyn Conn>) -> Option<MigrationError> {
    conn.set_timeout(Some(Duration::from_secs(2)));
    let (kind, payload) = StreamReader::new(&mut *conn)
        .and_then(|mut r| r.next_record())
        .ok()?;
    if kind != Kind::Ack {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    Some(MigrationError::Refused(
        v.get("error")?.as_str()?.to_string(),
    ))
}

/// Pre-copy rounds, then the stop-and-copy phase. Returns when the guest was paused.
fn precopy_and_stop<W: Write>(
    m: &Machine,
    opts: &MigrateOptions,
    w: &mut StreamWriter<W>,
    report: &mut MigrationReport,
    start: Instant,
) -> Result<Instant, (MigrationError, bool)> {
    let reads_before = m.device_dirty_reads();
    let mut live = Live {
        m,
        w,
        pace: Pace::new(opts.max_bandwidth),
        start,
    };
    let paused_at = precopy(&mut live, &m.devices.ram_ranges, opts, report)?;
    report.device_dirty_reads = m.device_dirty_reads() - reads_before;
    log::info!(
        "migration: stop-and-copy sent {} pages and the device state in {} ms",
        report.final_pages,
        paused_at.elapsed().as_millis()
    );
    Ok(paused_at)
}

/// What the pre-copy loop ([`precopy`]) asks of the guest it migrates: a seam between the
/// order of the rounds and the machine (KVM, devices, the stream), which tests replace.
trait Source {
    /// Sends the RAM that holds data (`None`, round 0) or the pages of `dirty`, paced;
    /// returns the pages sent.
    fn send(&mut self, dirty: Option<&DirtyBitmap>, paced: bool) -> Result<u64, MigrationError>;
    /// ORs into `out` every page written since the last harvest, by every dirty source.
    fn harvest(&mut self, out: &mut DirtyBitmap) -> Result<DirtySources, MigrationError>;
    /// A phase or round starts: `round` (0 the full copy), sending about `pages` pages.
    fn starting(&mut self, phase: MigrationPhase, round: u32, pages: u64);
    /// A pre-copy round ended (status, log, and its `ROUND` record).
    fn round_done(&mut self, r: &Round);
    /// Stops everything that changes guest state (vCPUs, device queues, passthrough devices
    /// in STOP, vhost-user rings).
    fn quiesce(&mut self) -> Result<(), MigrationError>;
    /// Sends the device data, the machine state and END.
    fn send_final_state(&mut self) -> Result<(), MigrationError>;
}

/// The rounds: the full copy; then, while more than `opts.max_dirty_pages` pages are
/// dirty and at most `opts.max_rounds` rounds ran after it, the pages found dirty in the
/// last harvest; then the stop-and-copy: quiesce, the last harvest (nothing writes after
/// it), every page still dirty, the device and machine state. Returns when the guest was
/// paused. A failure says whether the guest was paused (`true`) by then.
fn precopy<S: Source>(
    s: &mut S,
    ram: &[(u64, u64)],
    opts: &MigrateOptions,
    report: &mut MigrationReport,
) -> Result<Instant, (MigrationError, bool)> {
    let mut dirty = DirtyBitmap::new(ram);
    let mut round = 0;
    loop {
        let t = Instant::now();
        let pages = if round == 0 {
            s.starting(MigrationPhase::Copy, 0, 0);
            s.send(None, true)
        } else {
            s.starting(MigrationPhase::Copy, round, dirty.count());
            let sent = s.send(Some(&dirty), true);
            dirty.clear();
            sent
        }
        .map_err(|e| (e, false))?;
        let h = Instant::now();
        let sources = s.harvest(&mut dirty).map_err(|e| (e, false))?;
        report.dirty_by_source.add(sources);
        let r = Round {
            round,
            pages,
            ms: t.elapsed().as_millis() as u64,
            dirty_after: dirty.count(),
            harvest_ms: h.elapsed().as_secs_f64() * 1e3,
            dirty_by_source: sources,
        };
        report.pages += pages;
        s.round_done(&r);
        report.rounds.push(r);
        round += 1;
        if dirty.count() <= opts.max_dirty_pages || round > opts.max_rounds {
            break;
        }
    }
    // Stop and copy.
    s.starting(MigrationPhase::StopAndCopy, round, dirty.count());
    let paused_at = Instant::now();
    s.quiesce().map_err(|e| (e, false))?;
    let fin = (|| {
        // After STOP no device writes anymore: this harvest is the last.
        let sources = s.harvest(&mut dirty)?;
        report.dirty_by_source.add(sources);
        report.final_by_source = sources;
        let pages = s.send(Some(&dirty), false)?;
        report.final_pages = pages;
        report.pages += pages;
        s.send_final_state()
    })();
    fin.map_err(|e| (e, true))?;
    Ok(paused_at)
}

/// [`Source`] over the running machine and the stream to the destination.
struct Live<'a, W: Write> {
    m: &'a Machine,
    w: &'a mut StreamWriter<W>,
    pace: Pace,
    start: Instant,
}

impl<W: Write> Source for Live<'_, W> {
    fn send(&mut self, dirty: Option<&DirtyBitmap>, paced: bool) -> Result<u64, MigrationError> {
        let mut unpaced = Pace::new(0);
        let pace = if paced { &mut self.pace } else { &mut unpaced };
        send_pages(self.m, self.w, dirty, pace)
    }

    fn harvest(&mut self, out: &mut DirtyBitmap) -> Result<DirtySources, MigrationError> {
        Ok(self.m.harvest(out)?)
    }

    fn starting(&mut self, phase: MigrationPhase, round: u32, pages: u64) {
        let m = self.m;
        let start_at = m
            .progress
            .pages_sent
            .load(std::sync::atomic::Ordering::Relaxed);
        if phase == MigrationPhase::Copy && round == 0 {
            let round0: u64 = m.ram.data_extents().iter().map(|r| r.1 / 4096).sum();
            m.progress
                .pages_sent
                .store(0, std::sync::atomic::Ordering::Relaxed);
            m.progress.set(Some(ProgressState {
                phase,
                round_pages: round0,
                ..Default::default()
            }));
            return;
        }
        m.progress.update(|p| {
            p.phase = phase;
            // The stop-and-copy keeps the last pre-copy round's number.
            if phase == MigrationPhase::Copy {
                p.round = round;
            }
            p.round_start = start_at;
            p.round_pages = pages;
        });
    }

    fn round_done(&mut self, r: &Round) {
        progress(self.m, r, self.start);
        let _ = self.w.json(Kind::Round, r);
    }

    fn quiesce(&mut self) -> Result<(), MigrationError> {
        quiesce(self.m)
    }

    fn send_final_state(&mut self) -> Result<(), MigrationError> {
        send_final_state(self.m, self.w)
    }
}

fn progress(m: &Machine, r: &Round, start: Instant) {
    let (rate, downtime) = (r.dirty_rate(), r.expected_downtime_ms());
    m.progress.update(|p| {
        p.dirty_pages = r.dirty_after;
        p.dirty_rate = rate;
        p.expected_downtime_ms = downtime as u64;
    });
    log::info!(
        "migration: round {}: sent {} pages ({} MiB) in {} ms; {} pages dirty after it \
         ({} pages/s), harvest {:.2} ms; estimated downtime {:.0} ms; {:.1} s so far",
        r.round,
        r.pages,
        (r.pages * 4096) >> 20,
        r.ms,
        r.dirty_after,
        rate,
        r.harvest_ms,
        downtime,
        start.elapsed().as_secs_f64()
    );
}

/// Writes a snapshot of the guest into `dir/snapshot.vmm`: the guest is paused for the
/// copy and then continues (or stays paused if it was). With `verify`, the snapshot also
/// carries a hash of every RAM page, which a restore compares with what it loaded.
///
/// # Errors
/// [`MigrationError`]; the guest keeps running either way.
pub fn snapshot(
    m: &Machine,
    dir: &std::path::Path,
    verify: bool,
) -> Result<MigrationReport, MigrationError> {
    let _busy = m
        .busy
        .try_lock()
        .map_err(|_| MigrationError::Busy("a snapshot or migration is in progress".into()))?;
    m.check_migratable()?;
    std::fs::create_dir_all(dir)
        .map_err(|e| MigrationError::Transport(format!("cannot create {}", dir.display()), e))?;
    let path = dir.join("snapshot.vmm");
    let tmp = dir.join("snapshot.vmm.partial");
    let start = Instant::now();
    let was_paused = *m.lifecycle.locked() == Lifecycle::Paused;
    quiesce(m)?;
    let result = (|| {
        // Only the VMM's user may read guest RAM; a file or link left at the partial path
        // (a stale one, or one planted to redirect the write) is removed, never followed.
        let _ = std::fs::remove_file(&tmp);
        let f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
        }
        .map_err(|e| MigrationError::Transport(format!("cannot create {}", tmp.display()), e))?;
        let mut w = StreamWriter::new(std::io::BufWriter::with_capacity(1 << 20, f))?;
        w.json(Kind::Config, &m.current_config())?;
        let pages = send_pages(m, &mut w, None, &mut Pace::new(0))?;
        if verify {
            // The restore compares its RAM with these.
            w.json(
                Kind::Handover,
                &Handover {
                    verify: true,
                    timeout_ms: 0,
                },
            )?;
            w.hashes(&ram_hashes(m)?)?;
        }
        send_final_state(m, &mut w)?;
        w.flush()?;
        let bytes = w.bytes;
        let f = w
            .get_mut()
            .get_ref()
            .sync_all()
            .map_err(|e| MigrationError::Transport("cannot sync the snapshot".into(), e));
        f?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            MigrationError::Transport(format!("cannot write {}", path.display()), e)
        })?;
        Ok(MigrationReport {
            pages,
            bytes,
            downtime_ms: start.elapsed().as_millis() as u64,
            total_ms: start.elapsed().as_millis() as u64,
            ..Default::default()
        })
    })();
    unquiesce(m, was_paused);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;
