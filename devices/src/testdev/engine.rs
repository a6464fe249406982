//! Registers and the DMA engine thread of the test device.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::dma::{DmaFault, DmaSpace, PAGE};
use super::*;

#[derive(Debug, Default, Clone, Copy)]
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
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        });
        let (tx, rx) = channel();
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("dma-engine".into())
            .spawn(move || engine(&s, &rx))
            .ok();
        Self {
            shared,
            jobs: tx,
            worker,
        }
    }

    /// The DMA space (for the server's DMA_MAP and DMA_UNMAP).
    pub fn dma(&self) -> MutexGuard<'_, DmaSpace> {
        lock(&self.shared.dma)
    }

    /// Reads BAR 0.
    pub fn bar_read(&self, offset: u64, data: &mut [u8]) {
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
                if r.status == STATUS_BUSY {
                    r.error = ERR_BUSY;
                    return;
                }
                r.status = STATUS_BUSY;
                r.error = ERR_NONE;
                r.result = 0;
                r.progress = 0;
                let job = *r;
                drop(r);
                if self.jobs.send(job).is_err() {
                    lock(&self.shared.regs).status = STATUS_ERROR;
                }
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

    /// Clears the fault log.
    pub fn fault_log_clear(&self) {
        *lock(&self.shared.fault_log) = (Vec::new(), 0);
    }
}

impl Drop for TestDevice {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let (tx, _) = channel();
        drop(std::mem::replace(&mut self.jobs, tx));
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn fault(s: &Shared, f: DmaFault) {
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
            Err(Some(f)) => fault(s, f),
            Err(None) => {
                let mut r = lock(&s.regs);
                r.status = STATUS_ERROR;
                r.error = ERR_BAD_OP;
            }
        }
    }
}

/// Executes one operation in chunks that never cross a destination page.
fn run(s: &Shared, job: &Regs) -> Result<u64, Option<DmaFault>> {
    let mut done = 0u64;
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
        {
            // One chunk under the lock: an UNMAP waits for it, and no later chunk can reach
            // what it removed.
            let mut dma = lock(&s.dma);
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
                        return Ok(done + i as u64 + 1);
                    }
                }
                _ => return Err(None),
            }
        }
        done += n as u64;
        lock(&s.regs).progress = done;
        if job.delay_us > 0 {
            std::thread::sleep(Duration::from_micros(u64::from(job.delay_us)));
        }
        if s.stop.load(Ordering::Acquire) {
            return Err(None);
        }
    }
    Ok(0)
}
