//! Registers and the DMA engine thread of the test device.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::dma::{DmaFault, DmaSpace, PAGE};
use super::*;
use sync::MutexExt;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Regs {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
    pub op: u32,
    pub fill: u32,
    pub status: u32,
    pub error: u32,
    pub fault_iova: u64,
    pub result: u64,
    pub delay_us: u32,
    pub completed: u64,
    pub bytes: u64,
    pub faults: u64,
    pub progress: u64,
}

#[derive(Default)]
pub(crate) struct Irqs {
    pub msix: Vec<Option<File>>,
    pub err: Option<File>,
}

pub(crate) struct Shared {
    pub regs: Mutex<Regs>,
    pub dma: Mutex<DmaSpace>,
    pub irqs: Mutex<Irqs>,
    /// `(iova, write)` records, and how many were lost to a full log.
    pub fault_log: Mutex<(Vec<(u64, bool)>, u32)>,
    pub stop: AtomicBool,
    /// Migration state (`mig::*`) and, in STOP_COPY/RESUMING, the device data.
    pub mig: Mutex<(u32, Vec<u8>)>,
    /// Signalled when the migration state changes (the engine waits in STOP).
    pub mig_changed: Condvar,
    /// Page requests ([`REGION_PAGE_REQUEST`]).
    pub prq: Mutex<Prq>,
    /// Signalled when a page request is answered.
    pub prq_answered: Condvar,
    /// Held for the whole of one page request: the engine and the flood thread take turns.
    pub prq_slot: Mutex<()>,
    /// Held while the doorbell's eventfd is drained and rung.
    pub doorbell: Mutex<()>,
}

/// The page-request interface's state.
#[derive(Debug, Default)]
pub(crate) struct Prq {
    pub enabled: bool,
    /// The request waiting for an answer: `(id, iova, write)`.
    pub pending: Option<(u32, u64, bool)>,
    /// The answer to the pending request.
    pub answer: Option<u32>,
    pub next_id: u32,
    pub requests: u64,
    pub retries: u64,
    pub invalid: u64,
    pub timeouts: u64,
}

/// Everything the device carries to another instance of itself.
#[derive(serde::Serialize, serde::Deserialize)]
struct MigrationData {
    version: u32,
    regs: Regs,
    fault_log: (Vec<(u64, bool)>, u32),
}

/// A refused migration transition or bad device data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MigrationError {
    /// The arc is not supported from the current state.
    #[error("migration state {from} -> {to} is not supported")]
    Arc {
        /// Current state.
        from: u32,
        /// Requested state.
        to: u32,
    },
    /// The data written in RESUMING is not this device's.
    #[error("bad device data: {0}")]
    BadData(String),
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.locked()
}

fn signal(f: &Option<File>) {
    if let Some(mut f) = f.as_ref() {
        let _ = f.write_all(&1u64.to_ne_bytes());
    }
}

/// The device: registers, DMA space, interrupts and the engine thread.
pub struct TestDevice {
    pub(crate) shared: Arc<Shared>,
    jobs: Sender<Regs>,
    worker: Option<JoinHandle<()>>,
    /// The doorbell's eventfd, once asked for.
    doorbell: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
}

impl TestDevice {
    /// A doorbell the guest rang through the ioeventfd takes effect before any register
    /// read the guest makes after it (PCI orders a read after the posted writes before it):
    /// the read first drains the eventfd.
    fn doorbell_before_read(&self) {
        if let Some(e) = &self.doorbell {
            drain_doorbell(&self.shared, e, &self.jobs);
        }
    }
}

impl Default for TestDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl TestDevice {
    /// A device in its reset state, with its engine thread running.
    pub fn new() -> Self {
        let shared = Arc::new(Shared {
            regs: Mutex::new(Regs::default()),
            dma: Mutex::new(DmaSpace::default()),
            irqs: Mutex::new(Irqs::default()),
            fault_log: Mutex::new((Vec::new(), 0)),
            stop: AtomicBool::new(false),
            mig: Mutex::new((mig::RUNNING, Vec::new())),
            mig_changed: Condvar::new(),
            prq: Mutex::new(Prq::default()),
            prq_answered: Condvar::new(),
            prq_slot: Mutex::new(()),
            doorbell: Mutex::new(()),
        });
        let (tx, rx) = channel();
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("dma-engine".into())
            .spawn(move || {
                devices::seccomp::confine("dma-engine", crate::seccomp::ENGINE);
                engine(&s, &rx)
            })
            .ok();
        Self {
            shared,
            jobs: tx,
            worker,
            doorbell: None,
        }
    }

    /// An eventfd that rings the doorbell: any write to it starts the operation the
    /// registers describe, as a write of 1 to [`regs::DOORBELL`] does (the VMM registers it
    /// as an ioeventfd at the doorbell's address, so the guest's doorbell write never becomes
    /// a message). A thread of the device waits on it.
    ///
    /// # Errors
    /// When the eventfd or the thread cannot be made.
    pub fn doorbell_eventfd(&mut self) -> std::io::Result<std::os::fd::RawFd> {
        if let Some(e) = &self.doorbell {
            return Ok(std::os::fd::AsRawFd::as_raw_fd(&**e));
        }
        let evt = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?);
        let (s, jobs, e) = (self.shared.clone(), self.jobs.clone(), evt.clone());
        std::thread::Builder::new()
            .name("dma-doorbell".into())
            .spawn(move || {
                devices::seccomp::confine("dma-doorbell", crate::seccomp::DOORBELL);
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&*e),
                    events: libc::POLLIN,
                    revents: 0,
                };
                while !s.stop.load(Ordering::Acquire) {
                    // SAFETY: one live pollfd.
                    if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
                        continue;
                    }
                    drain_doorbell(&s, &e, &jobs);
                }
            })?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*evt);
        self.doorbell = Some(evt);
        Ok(fd)
    }

    /// Makes the device hostile: a thread posts page requests for IOVAs nobody mapped, one
    /// after the other, for as long as the device lives (each waits for its answer, as a
    /// stalled access would). For the test that the VMM throttles such a device.
    pub fn start_flood(&self) {
        let s = self.shared.clone();
        let _ = std::thread::Builder::new()
            .name("prq-flood".into())
            .spawn(move || {
                devices::seccomp::confine("prq-flood", crate::seccomp::ENGINE);
                let mut i = 0u64;
                while !s.stop.load(Ordering::Acquire) {
                    if !lock(&s.prq).enabled {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    let iova = FLOOD_IOVA + (i % 256) * PAGE;
                    request_page(&s, DmaFault { iova, write: true });
                    i += 1;
                }
            });
    }

    /// The DMA space (for the server's DMA_MAP and DMA_UNMAP).
    pub fn dma(&self) -> MutexGuard<'_, DmaSpace> {
        lock(&self.shared.dma)
    }

    /// Reads BAR 0.
    pub fn bar_read(&self, offset: u64, data: &mut [u8]) {
        self.doorbell_before_read();
        let r = *lock(&self.shared.regs);
        let reg64 = |base: u64, v: u64| {
            (offset >= base && offset < base + 8).then(|| v >> (8 * (offset - base)))
        };
        let v = match offset {
            regs::ID => u64::from(ID_VALUE),
            regs::VERSION => 1,
            regs::OP => u64::from(r.op),
            regs::FILL => u64::from(r.fill),
            regs::STATUS => u64::from(r.status),
            regs::ERROR => u64::from(r.error),
            regs::DELAY_US => u64::from(r.delay_us),
            o => reg64(regs::SRC, r.src)
                .or_else(|| reg64(regs::DST, r.dst))
                .or_else(|| reg64(regs::LEN, r.len))
                .or_else(|| reg64(regs::FAULT_IOVA, r.fault_iova))
                .or_else(|| reg64(regs::RESULT, r.result))
                .or_else(|| reg64(regs::COMPLETED, r.completed))
                .or_else(|| reg64(regs::BYTES, r.bytes))
                .or_else(|| reg64(regs::FAULTS, r.faults))
                .or_else(|| reg64(regs::PROGRESS, r.progress))
                .or_else(|| reg64(regs::INSTANCE, u64::from(std::process::id())))
                .or_else(|| reg64(regs::PAGE_REQUESTS, lock(&self.shared.prq).requests))
                .unwrap_or_else(|| {
                    let _ = o;
                    0
                }),
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (8 * i)) as u8;
        }
    }

    /// Writes BAR 0.
    pub fn bar_write(&self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let mut r = lock(&self.shared.regs);
        let set64 = |reg: &mut u64, base: u64| {
            let shift = 8 * (offset - base);
            let mask = if n >= 8 {
                u64::MAX
            } else {
                ((1u64 << (8 * n)) - 1) << shift
            };
            *reg = (*reg & !mask) | ((v << shift) & mask);
        };
        match offset {
            regs::OP => r.op = v as u32,
            regs::FILL => r.fill = v as u32,
            regs::DELAY_US => r.delay_us = v as u32,
            regs::DOORBELL if v & 1 == 1 => {
                drop(r);
                ring(&self.shared, &self.jobs);
            }
            o if (regs::SRC..regs::SRC + 8).contains(&o) => set64(&mut r.src, regs::SRC),
            o if (regs::DST..regs::DST + 8).contains(&o) => set64(&mut r.dst, regs::DST),
            o if (regs::LEN..regs::LEN + 8).contains(&o) => set64(&mut r.len, regs::LEN),
            _ => {}
        }
    }

    /// Device reset: registers, mappings and logs cleared (a running transfer stops at its
    /// next chunk, since its mappings are gone).
    pub fn reset(&self) {
        lock(&self.shared.prq).pending = None;
        lock(&self.shared.dma).clear();
        *lock(&self.shared.regs) = Regs::default();
        *lock(&self.shared.fault_log) = (Vec::new(), 0);
        *lock(&self.shared.irqs) = Irqs::default();
    }

    /// Sets the eventfds of MSI-X vectors `start..` (index 2) or of the error IRQ (index 3).
    pub fn set_irqs(&self, index: u32, start: u32, fds: Vec<File>) {
        let mut irqs = lock(&self.shared.irqs);
        match index {
            2 => {
                if fds.is_empty() {
                    irqs.msix.clear();
                }
                for (i, f) in fds.into_iter().enumerate() {
                    let v = start as usize + i;
                    if v < MSIX_VECTORS as usize {
                        if irqs.msix.len() <= v {
                            irqs.msix.resize_with(v + 1, || None);
                        }
                        irqs.msix[v] = Some(f);
                    }
                }
            }
            3 => irqs.err = fds.into_iter().next(),
            _ => {}
        }
    }

    /// Reads the fault log region.
    pub fn fault_log_read(&self, offset: u64, data: &mut [u8]) {
        let log = lock(&self.shared.fault_log);
        let mut bytes = Vec::with_capacity(8 + 16 * log.0.len());
        bytes.extend_from_slice(&(log.0.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&log.1.to_le_bytes());
        for &(iova, write) in &log.0 {
            bytes.extend_from_slice(&iova.to_le_bytes());
            bytes.extend_from_slice(&u32::from(write).to_le_bytes());
            bytes.extend_from_slice(&0u32.to_le_bytes());
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| bytes.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Removes the first `n` records of the fault log (those a reader has seen) and resets
    /// its count of lost records.
    pub fn fault_log_consume(&self, n: u32) {
        let mut log = lock(&self.shared.fault_log);
        let n = (n as usize).min(log.0.len());
        log.0.drain(..n);
        log.1 = 0;
    }

    /// Reads the page-request region.
    pub fn prq_read(&self, offset: u64, data: &mut [u8]) {
        let p = lock(&self.shared.prq);
        let (id, iova, write) = p.pending.unwrap_or_default();
        let mut bytes = [0u8; 0x40];
        bytes[0..4].copy_from_slice(&u32::from(p.enabled).to_le_bytes());
        bytes[4..8].copy_from_slice(&u32::from(p.pending.is_some()).to_le_bytes());
        bytes[8..0x10].copy_from_slice(&iova.to_le_bytes());
        bytes[0x10..0x14].copy_from_slice(&u32::from(write).to_le_bytes());
        bytes[0x14..0x18].copy_from_slice(&id.to_le_bytes());
        bytes[0x20..0x28].copy_from_slice(&p.requests.to_le_bytes());
        bytes[0x28..0x30].copy_from_slice(&p.retries.to_le_bytes());
        bytes[0x30..0x38].copy_from_slice(&p.invalid.to_le_bytes());
        bytes[0x38..0x40].copy_from_slice(&p.timeouts.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| bytes.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes the page-request region: the enable bit at 0, an answer at 0x18.
    pub fn prq_write(&self, offset: u64, value: u64) {
        let mut p = lock(&self.shared.prq);
        match offset {
            0 => p.enabled = value & 1 == 1,
            0x18 => {
                let (id, code) = (value as u32, (value >> 32) as u32);
                if p.pending.is_some_and(|(pid, _, _)| pid == id) {
                    p.pending = None;
                    p.answer = Some(code);
                    self.shared.prq_answered.notify_all();
                }
            }
            _ => {}
        }
    }

    /// The migration state (`mig::*`).
    pub fn migration_state(&self) -> u32 {
        lock(&self.shared.mig).0
    }

    /// Moves to migration state `to` along the arcs of [`super::MIGRATION_DATA_SIZE`].
    ///
    /// # Errors
    /// [`MigrationError`]; the state is then unchanged.
    pub fn set_migration_state(&self, to: u32) -> Result<(), MigrationError> {
        // A doorbell rung before the stop takes effect while the device still runs.
        self.doorbell_before_read();
        let from = self.migration_state();
        if from == to {
            return Ok(());
        }
        match (from, to) {
            (mig::RUNNING, mig::STOP) => {
                lock(&self.shared.mig).0 = mig::STOP;
                // The engine checks the state under the DMA lock before each chunk: once we
                // have held the lock, no chunk runs until RUNNING again.
                drop(lock(&self.shared.dma));
            }
            (mig::STOP, mig::RUNNING) => {
                lock(&self.shared.mig).0 = mig::RUNNING;
                self.shared.mig_changed.notify_all();
            }
            (mig::STOP, mig::STOP_COPY) => {
                let data = MigrationData {
                    version: 1,
                    regs: *lock(&self.shared.regs),
                    fault_log: lock(&self.shared.fault_log).clone(),
                };
                let bytes = serde_json::to_vec(&data).unwrap_or_default();
                *lock(&self.shared.mig) = (mig::STOP_COPY, bytes);
            }
            (mig::STOP, mig::RESUMING) => *lock(&self.shared.mig) = (mig::RESUMING, Vec::new()),
            (mig::STOP_COPY, mig::STOP) => *lock(&self.shared.mig) = (mig::STOP, Vec::new()),
            (mig::RESUMING, mig::STOP) => {
                let bytes = std::mem::take(&mut lock(&self.shared.mig).1);
                let data: MigrationData = serde_json::from_slice(&bytes)
                    .map_err(|e| MigrationError::BadData(e.to_string()))?;
                if data.version != 1 {
                    return Err(MigrationError::BadData(format!("version {}", data.version)));
                }
                *lock(&self.shared.regs) = data.regs;
                *lock(&self.shared.fault_log) = data.fault_log;
                lock(&self.shared.mig).0 = mig::STOP;
                // A transfer that was in progress continues from where it stopped once the
                // device runs.
                if data.regs.status == STATUS_BUSY && self.jobs.send(data.regs).is_err() {
                    lock(&self.shared.regs).status = STATUS_ERROR;
                }
            }
            _ => return Err(MigrationError::Arc { from, to }),
        }
        Ok(())
    }

    /// Reads the device data (STOP_COPY) at `offset`; past its end reads 0.
    pub fn migration_data_read(&self, offset: u64, data: &mut [u8]) {
        let m = lock(&self.shared.mig);
        for (i, b) in data.iter_mut().enumerate() {
            *b = if m.0 == mig::STOP_COPY {
                usize::try_from(offset)
                    .ok()
                    .and_then(|o| m.1.get(o + i))
                    .copied()
                    .unwrap_or(0)
            } else {
                0
            };
        }
    }

    /// Size of the device data (STOP_COPY).
    pub fn migration_data_size(&self) -> u64 {
        let m = lock(&self.shared.mig);
        if m.0 == mig::STOP_COPY {
            m.1.len() as u64
        } else {
            0
        }
    }

    /// Writes device data (RESUMING) at `offset`.
    ///
    /// # Errors
    /// [`MigrationError::Arc`] outside RESUMING, `BadData` past the window.
    pub fn migration_data_write(&self, offset: u64, data: &[u8]) -> Result<(), MigrationError> {
        let mut m = lock(&self.shared.mig);
        if m.0 != mig::RESUMING {
            return Err(MigrationError::Arc {
                from: m.0,
                to: mig::RESUMING,
            });
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MIGRATION_DATA_SIZE)
            .ok_or_else(|| MigrationError::BadData("past the data window".into()))?;
        if m.1.len() < end as usize {
            m.1.resize(end as usize, 0);
        }
        m.1[offset as usize..end as usize].copy_from_slice(data);
        Ok(())
    }
}

impl Drop for TestDevice {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(e) = &self.doorbell {
            let _ = e.write(1);
        }
        let (tx, _) = channel();
        drop(std::mem::replace(&mut self.jobs, tx));
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Rings the doorbell if its eventfd was written (under the doorbell lock, so that a register
/// read that drains it first and the doorbell thread never both miss or both ring one write).
fn drain_doorbell(s: &Shared, e: &vmm_sys_util::eventfd::EventFd, jobs: &Sender<Regs>) {
    let _one = lock(&s.doorbell);
    if e.read().is_ok() {
        ring(s, jobs);
    }
}

/// The doorbell: starts the operation the registers describe (refused while busy, ignored
/// while stopped for migration).
fn ring(s: &Shared, jobs: &Sender<Regs>) {
    let mut r = lock(&s.regs);
    if r.status == STATUS_BUSY {
        r.error = ERR_BUSY;
        return;
    }
    if lock(&s.mig).0 != mig::RUNNING {
        // Stopped: no new work (the guest is paused; this is a stray write).
        return;
    }
    r.status = STATUS_BUSY;
    r.error = ERR_NONE;
    r.result = 0;
    r.progress = 0;
    let job = *r;
    drop(r);
    if jobs.send(job).is_err() {
        lock(&s.regs).status = STATUS_ERROR;
    }
}

/// Ends the transfer on fault `f`; unless the IOMMU (the VMM, refusing a DMA message) took it,
/// the fault also goes to the fault log and the error IRQ.
fn fault(s: &Shared, f: DmaFault, by_iommu: bool) {
    {
        let mut r = lock(&s.regs);
        r.status = STATUS_ERROR;
        r.error = if f.write {
            ERR_FAULT_WRITE
        } else {
            ERR_FAULT_READ
        };
        r.fault_iova = f.iova;
        r.faults += 1;
    }
    let irqs = lock(&s.irqs);
    if by_iommu {
        signal(irqs.msix.first().unwrap_or(&None));
        return;
    }
    drop(irqs);
    {
        let mut log = lock(&s.fault_log);
        if log.0.len() < FAULT_LOG_RECORDS {
            log.0.push((f.iova, f.write));
        } else {
            log.1 += 1;
        }
    }
    let irqs = lock(&s.irqs);
    signal(&irqs.err);
    signal(irqs.msix.first().unwrap_or(&None));
}

/// Posts a page request for the access that faulted and waits for the VMM's answer; true
/// when the access should be retried. False at once when page requests are off.
fn request_page(s: &Shared, f: DmaFault) -> bool {
    let _slot = lock(&s.prq_slot);
    let id = {
        let mut p = lock(&s.prq);
        if !p.enabled {
            return false;
        }
        let id = p.next_id;
        p.next_id = p.next_id.wrapping_add(1);
        p.pending = Some((id, f.iova, f.write));
        p.answer = None;
        p.requests += 1;
        id
    };
    signal(&lock(&s.irqs).err);
    let deadline = std::time::Instant::now() + Duration::from_millis(PRQ_TIMEOUT_MS);
    let mut p = lock(&s.prq);
    loop {
        if let Some(code) = p.answer.take() {
            if code == PRQ_RETRY {
                p.retries += 1;
                return true;
            }
            p.invalid += 1;
            return false;
        }
        let now = std::time::Instant::now();
        if now >= deadline || s.stop.load(Ordering::Acquire) {
            if p.pending.is_some_and(|(pid, _, _)| pid == id) {
                p.pending = None;
            }
            p.timeouts += 1;
            return false;
        }
        p = s
            .prq_answered
            .wait_timeout(p, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

/// Where a flooding device asks for pages (see [`TestDevice::start_flood`]).
const FLOOD_IOVA: u64 = 0xf10d_0000_0000;

/// Runs operations until the device is dropped.
fn engine(s: &Shared, jobs: &Receiver<Regs>) {
    while let Ok(job) = jobs.recv() {
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        if job.len == 0 || job.len > MAX_LEN {
            let mut r = lock(&s.regs);
            r.status = STATUS_ERROR;
            r.error = ERR_BAD_LEN;
            continue;
        }
        let outcome = run(s, &job);
        // The end of a transfer (status, counters, interrupt) happens while RUNNING only, under
        // the DMA lock as chunks do: a device stopped for migration keeps the transfer BUSY
        // with all its bytes done, and the device that resumes it reports the end.
        let Some(mut dma) = running_dma(s) else {
            return;
        };
        match outcome {
            Ok(result) => {
                let mut r = lock(&s.regs);
                r.status = STATUS_DONE;
                r.result = result;
                r.completed += 1;
                r.bytes += job.len;
                drop(r);
                signal(lock(&s.irqs).msix.first().unwrap_or(&None));
            }
            Err(Some(f)) => {
                // A DMA message the VMM refused is the IOMMU's fault, which the VMM reports
                // itself: the device only ends the transfer in error.
                let by_iommu = dma.iommu_refused.take() == Some(f);
                fault(s, f, by_iommu);
            }
            Err(None) => {
                let mut r = lock(&s.regs);
                r.status = STATUS_ERROR;
                r.error = ERR_BAD_OP;
            }
        }
    }
}

/// The DMA lock, taken while the device is RUNNING (waiting through a migration stop), or
/// `None` when the device is being dropped.
fn running_dma(s: &Shared) -> Option<MutexGuard<'_, DmaSpace>> {
    loop {
        let dma = lock(&s.dma);
        if lock(&s.mig).0 == mig::RUNNING {
            return Some(dma);
        }
        drop(dma);
        let mut m = lock(&s.mig);
        while m.0 != mig::RUNNING && !s.stop.load(Ordering::Acquire) {
            m = s
                .mig_changed
                .wait_timeout(m, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        if s.stop.load(Ordering::Acquire) {
            return None;
        }
    }
}

/// Executes one operation in chunks that never cross a destination page.
fn run(s: &Shared, job: &Regs) -> Result<u64, Option<DmaFault>> {
    // A transfer resumed after migration starts where it stopped.
    let mut done = job.progress.min(job.len);
    let mut a = vec![0u8; PAGE as usize];
    let mut b = vec![0u8; PAGE as usize];
    while done < job.len {
        let at = job.dst.wrapping_add(done);
        let n = (PAGE - at % PAGE).min(job.len - done) as usize;
        let src = job.src.checked_add(done);
        let dst = job.dst.checked_add(done).ok_or(Some(DmaFault {
            iova: job.dst,
            write: true,
        }))?;
        let mut requests = 0;
        loop {
            // One chunk under the lock: an UNMAP waits for it, and no later chunk can reach
            // what it removed.
            // Stopped for migration: parked here, between chunks, until RUNNING.
            let Some(mut dma) = running_dma(s) else {
                return Err(None);
            };
            let chunk = (|| -> Result<Option<u64>, Option<DmaFault>> {
                match job.op {
                    OP_COPY => {
                        let src = src.ok_or(Some(DmaFault {
                            iova: job.src,
                            write: false,
                        }))?;
                        dma.read(src, &mut a[..n]).map_err(Some)?;
                        dma.write(dst, &a[..n]).map_err(Some)?;
                    }
                    OP_FILL => {
                        a[..n].fill(job.fill as u8);
                        dma.write(dst, &a[..n]).map_err(Some)?;
                    }
                    OP_COMPARE => {
                        let src = src.ok_or(Some(DmaFault {
                            iova: job.src,
                            write: false,
                        }))?;
                        dma.read(src, &mut a[..n]).map_err(Some)?;
                        dma.read(dst, &mut b[..n]).map_err(Some)?;
                        if let Some(i) = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y) {
                            return Ok(Some(i as u64));
                        }
                    }
                    _ => return Err(None),
                }
                Ok(None)
            })();
            match chunk {
                Ok(Some(i)) => return Ok(done + i + 1),
                Ok(None) => {
                    done += n as u64;
                    lock(&s.regs).progress = done;
                    break;
                }
                // A miss: ask the VMM (outside the DMA lock, which its DMA_MAP takes), and
                // redo the chunk if it mapped the page.
                Err(Some(f)) if requests < PRQ_RETRIES_PER_CHUNK => {
                    drop(dma);
                    requests += 1;
                    if !request_page(s, f) {
                        return Err(Some(f));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if job.delay_us > 0 {
            std::thread::sleep(Duration::from_micros(u64::from(job.delay_us)));
        }
        if s.stop.load(Ordering::Acquire) {
            return Err(None);
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom};

    use super::super::dma::tests::memfile;
    use super::*;

    /// Maps `[iova, iova + size)` read-write to `offset` of `mem`.
    fn map_rw(d: &TestDevice, mem: &std::fs::File, iova: u64, size: u64, offset: u64) {
        d.dma()
            .map(
                iova,
                size,
                Some(mem.try_clone().unwrap()),
                offset,
                true,
                true,
            )
            .unwrap();
    }

    fn w64(d: &TestDevice, reg: u64, v: u64) {
        d.bar_write(reg, &v.to_le_bytes());
    }

    fn r32(d: &TestDevice, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(reg, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn a_stopped_transfer_moves_to_another_device_and_finishes_there() {
        let mut mem = memfile(64 << 10);
        let a = TestDevice::new();
        map_rw(&a, &mem, 0x10000, 64 << 10, 0);
        // A 16-page fill with 20 ms per page: stop it in the middle.
        w64(&a, regs::DST, 0x10000);
        w64(&a, regs::LEN, 64 << 10);
        a.bar_write(regs::OP, &OP_FILL.to_le_bytes());
        a.bar_write(regs::FILL, &0x5au32.to_le_bytes());
        a.bar_write(regs::DELAY_US, &20_000u32.to_le_bytes());
        a.bar_write(regs::DOORBELL, &1u32.to_le_bytes());
        // Stop once the transfer has made progress (a condition, not a delay; the deadline
        // only catches a hang).
        let start = std::time::Instant::now();
        while lock(&a.shared.regs).progress == 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "no progress");
            std::thread::yield_now();
        }
        a.set_migration_state(mig::STOP).unwrap();
        let progress_at_stop = lock(&a.shared.regs).progress;
        assert!(progress_at_stop > 0 && progress_at_stop < 64 << 10);
        assert_eq!(r32(&a, regs::STATUS), STATUS_BUSY);
        assert!(matches!(
            a.set_migration_state(mig::RUNNING + 10),
            Err(MigrationError::Arc { .. })
        ));
        a.set_migration_state(mig::STOP_COPY).unwrap();
        let size = a.migration_data_size() as usize;
        let mut data = vec![0u8; size];
        a.migration_data_read(0, &mut data);
        a.set_migration_state(mig::STOP).unwrap();
        // Dropping the device joins its engine: whatever it would still write is written.
        drop(a);
        // Stopped means stopped: what was saved is where the transfer stood at STOP, and not
        // a byte past it was written.
        let saved: MigrationData = serde_json::from_slice(&data).unwrap();
        assert_eq!(saved.regs.progress, progress_at_stop);
        let mut before = vec![0u8; 64 << 10];
        mem.seek(SeekFrom::Start(0)).unwrap();
        mem.read_exact(&mut before).unwrap();
        let at = progress_at_stop as usize;
        assert!(before[..at].iter().all(|&x| x == 0x5a));
        assert!(before[at..].iter().all(|&x| x == 0), "written after STOP");

        let b = TestDevice::new();
        map_rw(&b, &mem, 0x10000, 64 << 10, 0);
        assert_eq!(
            b.set_migration_state(mig::STOP_COPY),
            Err(MigrationError::Arc {
                from: mig::RUNNING,
                to: mig::STOP_COPY
            })
        );
        b.set_migration_state(mig::STOP).unwrap();
        b.set_migration_state(mig::RESUMING).unwrap();
        b.migration_data_write(0, &data).unwrap();
        b.set_migration_state(mig::STOP).unwrap();
        b.bar_write(regs::DELAY_US, &0u32.to_le_bytes());
        b.set_migration_state(mig::RUNNING).unwrap();
        let start = std::time::Instant::now();
        while r32(&b, regs::STATUS) == STATUS_BUSY {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(r32(&b, regs::STATUS), STATUS_DONE);
        let mut all = vec![0u8; 64 << 10];
        mem.seek(SeekFrom::Start(0)).unwrap();
        mem.read_exact(&mut all).unwrap();
        assert!(all.iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn bad_device_data_is_refused() {
        let d = TestDevice::new();
        d.set_migration_state(mig::STOP).unwrap();
        d.set_migration_state(mig::RESUMING).unwrap();
        d.migration_data_write(0, b"{not json").unwrap();
        assert!(matches!(
            d.set_migration_state(mig::STOP),
            Err(MigrationError::BadData(_))
        ));
        assert!(d.migration_data_write(MIGRATION_DATA_SIZE, &[1]).is_err());
    }

    fn prq(d: &TestDevice, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        d.prq_read(offset, &mut b);
        u64::from_le_bytes(b)
    }

    /// Waits for the device's pending page request (a condition; the deadline catches a
    /// hang) and returns `(id, iova, write)`.
    fn pending(d: &TestDevice) -> (u32, u64, bool) {
        let start = std::time::Instant::now();
        loop {
            if prq(d, 4) as u32 == 1 {
                return (prq(d, 0x14) as u32, prq(d, 8), prq(d, 0x10) & 1 == 1);
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no page request");
            std::thread::yield_now();
        }
    }

    fn wait_status(d: &TestDevice) -> u32 {
        let start = std::time::Instant::now();
        loop {
            let st = r32(d, regs::STATUS);
            if st != STATUS_BUSY {
                return st;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "transfer hung");
            std::thread::yield_now();
        }
    }

    /// With page requests on, a copy to an unmapped destination waits; the "VMM" maps the
    /// page and answers retry, and the copy completes; an invalid answer faults the access
    /// as before; with requests off, the fault is immediate and no request is made.
    #[test]
    fn page_requests_stall_the_transfer_until_answered() {
        let mut mem = memfile(64 << 10);
        let d = TestDevice::new();
        map_rw(&d, &mem, 0x10000, 16 << 10, 0);
        d.prq_write(0, 1);
        assert_eq!(prq(&d, 0) as u32, 1);
        // Copy 8 KiB from the mapped page to 0x40000, not mapped.
        w64(&d, regs::SRC, 0x10000);
        w64(&d, regs::DST, 0x40000);
        w64(&d, regs::LEN, 8 << 10);
        d.bar_write(regs::OP, &OP_COPY.to_le_bytes());
        d.bar_write(regs::DOORBELL, &1u32.to_le_bytes());
        let (id, iova, write) = pending(&d);
        assert_eq!((iova, write), (0x40000, true));
        assert_eq!(r32(&d, regs::STATUS), STATUS_BUSY, "stalled, not faulted");
        // A stale answer (another id) changes nothing.
        d.prq_write(0x18, u64::from(id + 1) | (u64::from(PRQ_RETRY) << 32));
        assert_eq!(prq(&d, 4) as u32, 1);
        // The "VMM" maps the destination (file offset 32 KiB) and answers retry.
        map_rw(&d, &mem, 0x40000, 8 << 10, 32 << 10);
        d.prq_write(0x18, u64::from(id) | (u64::from(PRQ_RETRY) << 32));
        assert_eq!(wait_status(&d), STATUS_DONE);
        let mut copied = vec![0u8; 8 << 10];
        mem.seek(SeekFrom::Start(32 << 10)).unwrap();
        mem.read_exact(&mut copied).unwrap();
        let mut src = vec![0u8; 8 << 10];
        mem.seek(SeekFrom::Start(0)).unwrap();
        mem.read_exact(&mut src).unwrap();
        assert_eq!(copied, src);
        assert_eq!((prq(&d, 0x20), prq(&d, 0x28), prq(&d, 0x30)), (1, 1, 0));

        // Invalid: a fill of 0x80000 faults with the IOVA, as without page requests.
        w64(&d, regs::DST, 0x80000);
        w64(&d, regs::LEN, 4096);
        d.bar_write(regs::OP, &OP_FILL.to_le_bytes());
        d.bar_write(regs::DOORBELL, &1u32.to_le_bytes());
        let (id, iova, _) = pending(&d);
        assert_eq!(iova, 0x80000);
        d.prq_write(0x18, u64::from(id) | (u64::from(PRQ_INVALID) << 32));
        assert_eq!(wait_status(&d), STATUS_ERROR);
        assert_eq!(r32(&d, regs::ERROR), ERR_FAULT_WRITE);
        assert_eq!((prq(&d, 0x20), prq(&d, 0x30)), (2, 1));
        assert_eq!(lock(&d.shared.fault_log).0, vec![(0x80000, true)]);

        // Consuming the records read keeps one logged after the read.
        lock(&d.shared.fault_log).0.push((0x90000, false));
        d.fault_log_consume(1);
        assert_eq!(lock(&d.shared.fault_log).0, vec![(0x90000, false)]);
        d.fault_log_consume(5);
        assert!(lock(&d.shared.fault_log).0.is_empty());

        // Off: an immediate fault and no request.
        d.prq_write(0, 0);
        d.bar_write(regs::DOORBELL, &1u32.to_le_bytes());
        assert_eq!(wait_status(&d), STATUS_ERROR);
        assert_eq!(prq(&d, 0x20), 2);
    }
}
