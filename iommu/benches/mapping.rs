//! The mapping core against a baseline of one `BTreeMap` entry per mapping (the design Cloud
//! Hypervisor and crosvm use for virtio-iommu domains), on the same random workload of 2^20
//! page-sized mappings: IOVAs are a random permutation of a dense 4 GiB window (what the
//! guest's IOVA allocator hands out), GPAs random pages of a 16 GiB guest, permissions R or RW.
//!
//! Prints one line per structure: bytes of metadata per mapped 4 KiB page (a counting global
//! allocator) and ns per map, translate and unmap (each over the whole workload, best of 3),
//! then the ratios. Criterion then measures the same three operations on both structures.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use iommu::pagetable::{IoPageTable, Perm};

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: usize = 1 << 20;
const IOVA_BASE_PAGE: u64 = 0x1_0000_0000 >> 12;
const GUEST_PAGES: u64 = (16u64 << 30) >> 12;

/// A small xorshift generator: the workload is the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Workload {
    /// (iova page, gpa page, perm) in map order.
    maps: Vec<(u64, u64, Perm)>,
    /// IOVAs (bytes) to translate, in random order.
    lookups: Vec<u64>,
    /// IOVA pages to unmap, in random order.
    unmaps: Vec<u64>,
}

fn shuffled(rng: &mut Rng, mut v: Vec<u64>) -> Vec<u64> {
    for i in (1..v.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

fn workload() -> Workload {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let pages: Vec<u64> = (0..N as u64).map(|i| IOVA_BASE_PAGE + i).collect();
    let order = shuffled(&mut rng, pages.clone());
    let maps = order
        .iter()
        .map(|&p| {
            let perm = if rng.next().is_multiple_of(2) {
                Perm::READ
            } else {
                Perm::RW
            };
            (p, rng.next() % GUEST_PAGES, perm)
        })
        .collect();
    let lookups = shuffled(&mut rng, pages.clone())
        .into_iter()
        .map(|p| (p << 12) | (rng.next() & 0xff8))
        .collect();
    let unmaps = shuffled(&mut rng, pages);
    Workload {
        maps,
        lookups,
        unmaps,
    }
}

/// The operations both structures implement with virtio-iommu semantics.
trait Mappings: Default {
    const NAME: &'static str;
    /// MAP of pages `[first, last]`: fails on overlap.
    fn map(&mut self, first: u64, last: u64, gpa: u64, perm: Perm) -> bool;
    /// Translation of one byte address for a read.
    fn translate(&self, iova: u64) -> Option<u64>;
    /// UNMAP of pages `[first, last]`: fails when it would split a mapping.
    fn unmap(&mut self, first: u64, last: u64) -> bool;
}

impl Mappings for IoPageTable {
    const NAME: &'static str = "page table (ours)";
    fn map(&mut self, first: u64, last: u64, gpa: u64, perm: Perm) -> bool {
        IoPageTable::map(self, first, last, gpa, perm).is_ok()
    }
    fn translate(&self, iova: u64) -> Option<u64> {
        let pte = self.get(iova >> 12)?;
        pte.perm
            .read()
            .then_some((pte.gpa_page << 12) | (iova & 0xfff))
    }
    fn unmap(&mut self, first: u64, last: u64) -> bool {
        self.check_unmap(first, last).is_ok() && self.remove(first, last, |_| {}) > 0
    }
}

#[derive(Clone, Copy)]
struct Mapping {
    last: u64,
    gpa: u64,
    perm: Perm,
}

/// One entry per mapping, keyed by the first IOVA page.
#[derive(Default)]
struct BTreeBaseline(BTreeMap<u64, Mapping>);

impl Mappings for BTreeBaseline {
    const NAME: &'static str = "BTreeMap per mapping";
    fn map(&mut self, first: u64, last: u64, gpa: u64, perm: Perm) -> bool {
        if let Some((_, m)) = self.0.range(..=last).next_back() {
            if m.last >= first {
                return false;
            }
        }
        self.0.insert(first, Mapping { last, gpa, perm });
        true
    }
    fn translate(&self, iova: u64) -> Option<u64> {
        let page = iova >> 12;
        let (&first, m) = self.0.range(..=page).next_back()?;
        (page <= m.last && m.perm.read()).then_some(((m.gpa + page - first) << 12) | (iova & 0xfff))
    }
    fn unmap(&mut self, first: u64, last: u64) -> bool {
        if let Some((&s, m)) = self.0.range(..first).next_back() {
            if m.last >= first {
                let _ = s;
                return false;
            }
        }
        let inside: Vec<u64> = self.0.range(first..=last).map(|(&k, _)| k).collect();
        if let Some(k) = inside.last() {
            if self.0[k].last > last {
                return false;
            }
        }
        for k in &inside {
            self.0.remove(k);
        }
        !inside.is_empty()
    }
}

struct Figures {
    bytes_per_page: f64,
    map_ns: f64,
    translate_ns: f64,
    unmap_ns: f64,
}

fn measure<M: Mappings>(w: &Workload) -> Figures {
    let mut best = Figures {
        bytes_per_page: 0.0,
        map_ns: f64::MAX,
        translate_ns: f64::MAX,
        unmap_ns: f64::MAX,
    };
    for _ in 0..3 {
        let before = ALLOCATED.load(Ordering::Relaxed);
        let mut m = M::default();
        let t = Instant::now();
        for &(p, g, perm) in &w.maps {
            assert!(m.map(p, p, g, perm));
        }
        let map = t.elapsed();
        best.bytes_per_page = (ALLOCATED.load(Ordering::Relaxed) - before) as f64 / N as f64;
        let t = Instant::now();
        let mut sum = 0u64;
        for &iova in &w.lookups {
            sum = sum.wrapping_add(m.translate(iova).unwrap_or(1));
        }
        let translate = t.elapsed();
        black_box(sum);
        let t = Instant::now();
        for &p in &w.unmaps {
            assert!(m.unmap(p, p));
        }
        let unmap = t.elapsed();
        let per = |d: Duration| d.as_nanos() as f64 / N as f64;
        best.map_ns = best.map_ns.min(per(map));
        best.translate_ns = best.translate_ns.min(per(translate));
        best.unmap_ns = best.unmap_ns.min(per(unmap));
    }
    println!(
        "{:<22} {:>6.2} bytes/page  map {:>6.1} ns  translate {:>6.1} ns  unmap {:>6.1} ns",
        M::NAME,
        best.bytes_per_page,
        best.map_ns,
        best.translate_ns,
        best.unmap_ns
    );
    best
}

fn summary() {
    let w = workload();
    println!("workload: {N} page-sized mappings, random order (best of 3 runs)");
    let ours = measure::<IoPageTable>(&w);
    let base = measure::<BTreeBaseline>(&w);
    println!(
        "ratio (baseline / ours): memory {:.1}x  map {:.1}x  translate {:.1}x  unmap {:.1}x",
        base.bytes_per_page / ours.bytes_per_page,
        base.map_ns / ours.map_ns,
        base.translate_ns / ours.translate_ns,
        base.unmap_ns / ours.unmap_ns
    );
}

fn built<M: Mappings>(w: &Workload) -> M {
    let mut m = M::default();
    for &(p, g, perm) in &w.maps {
        m.map(p, p, g, perm);
    }
    m
}

fn bench_structure<M: Mappings>(c: &mut Criterion, w: &Workload) {
    let mut g = c.benchmark_group(M::NAME);
    g.sample_size(10);
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("map 2^20 pages", |b| {
        b.iter_batched(
            M::default,
            |mut m| {
                for &(p, gpa, perm) in &w.maps {
                    m.map(p, p, gpa, perm);
                }
                m
            },
            BatchSize::LargeInput,
        )
    });
    let m = built::<M>(w);
    g.bench_function("translate 2^20 pages", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &iova in &w.lookups {
                sum = sum.wrapping_add(m.translate(iova).unwrap_or(1));
            }
            sum
        })
    });
    drop(m);
    g.bench_function("unmap 2^20 pages", |b| {
        b.iter_batched(
            || built::<M>(w),
            |mut m| {
                for &p in &w.unmaps {
                    m.unmap(p, p);
                }
                m
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    summary();
    let w = workload();
    bench_structure::<IoPageTable>(c, &w);
    bench_structure::<BTreeBaseline>(c, &w);
}

criterion_group!(mapping, benches);
criterion_main!(mapping);
