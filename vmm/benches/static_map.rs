//! Populating and mapping all guest RAM for a passthrough device outside the vIOMMU, with 1, 2
//! and N threads (N = the host's CPUs, and twice that), cut on 2 MiB (as the "Multithreaded VFIO page pinning" review asked). Each run
//! makes fresh guest RAM (a memfd, as the VMM does) of `STATIC_MAP_GIB` GiB (default 4) and
//! maps it on a backend that only counts calls, so what is timed is the population (the page
//! faults) and the cut; a VFIO type1 backend would add its pinning inside each DMA_MAP.
//!
//! Prints, per thread count, the time, GiB/s and the speed-up against one thread measured in
//! the same run. `cargo bench -p vmm --bench static_map`.

use std::time::Duration;

use iommu::backend::{BackendCaps, BackendError, DmaBackend};
use iommu::Perm;
use vmm::build::static_map::{cut_align, default_threads, map_all};
use vmm::machine::memory::GuestRam;

/// Counts map calls; maps nothing.
struct Counting(u64);

impl DmaBackend for Counting {
    fn name(&self) -> String {
        "counting".into()
    }
    fn caps(&self) -> BackendCaps {
        BackendCaps::default()
    }
    fn map(&mut self, _iova: u64, _gpa: u64, _len: u64, _perm: Perm) -> Result<(), BackendError> {
        self.0 += 1;
        Ok(())
    }
    fn unmap(&mut self, _iova: u64, _len: u64) -> Result<(), BackendError> {
        Ok(())
    }
}

fn run(size: u64, threads: usize) -> Duration {
    let ram = GuestRam::new(size, false).expect("guest RAM");
    let ranges: Vec<(u64, u64, u64)> = ram
        .regions()
        .iter()
        .map(|&(gpa, len, hva, _)| (gpa, len, hva))
        .collect();
    let mut dma = Counting(0);
    let r = map_all(&mut dma, &ranges, cut_align(false), threads).expect("static map");
    assert_eq!(r.bytes, size);
    r.elapsed
}

fn main() {
    // `cargo test --benches` runs this with `--test`: one small run only.
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    let gib: u64 = std::env::var("STATIC_MAP_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 4 });
    let size = gib << 30;
    let n = default_threads();
    let mut counts = vec![1, 2, n, 2 * n];
    counts.dedup();
    counts.sort_unstable();
    counts.dedup();
    println!("populate and map {gib} GiB of guest RAM, cuts on 2 MiB (best of 3 runs)");
    let mut base = None;
    for t in counts {
        let best = (0..if quick { 1 } else { 3 })
            .map(|_| run(size, t))
            .min()
            .unwrap_or_default();
        let secs = best.as_secs_f64();
        let one = *base.get_or_insert(secs);
        println!(
            "  {t:>2} threads: {:>8.1} ms  {:>6.2} GiB/s  speed-up {:.2}x",
            secs * 1e3,
            gib as f64 / secs,
            one / secs
        );
    }
}
