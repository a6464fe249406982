//! The mapping core against a baseline of one `BTreeMap` entry per mapping (the design Cloud
//! Hypervisor and crosvm use for virtio-iommu domains), on the same workloads. The main one:
//! 2^20 page-sized mappings whose IOVAs are a random permutation of a dense 4 GiB window (what
//! the guest's IOVA allocator hands out), GPAs random pages of a 16 GiB guest, permissions R
//! or RW. Then IOVA layouts that are not dense: one page mapped in 8, one per 2 MiB, one per
//! 1 GiB, and a layout like Linux's IOVA allocator's (mappings of 1 to 64 pages, each aligned
//! to its size rounded up to a power of two, handed out top-down from 4 GiB).
//!
//! Prints one line per layout and structure: bytes of metadata per mapped 4 KiB page (a
//! counting global allocator) and ns per map, translate and unmap operation (each over the
//! whole workload, best of 3), then the ratios. Criterion then measures the same three
//! operations on both structures for the dense layout.
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
    /// (first IOVA page, pages, GPA page, perm) in map order.
    maps: Vec<(u64, u64, u64, Perm)>,
    /// IOVAs (bytes) to translate, in random order.
    lookups: Vec<u64>,
    /// (first, last) IOVA pages to unmap, in random order.
    unmaps: Vec<(u64, u64)>,
}

impl Workload {
    fn pages(&self) -> u64 {
        self.maps.iter().map(|m| m.1).sum()
    }
}

fn shuffled<T>(rng: &mut Rng, mut v: Vec<T>) -> Vec<T> {
    for i in (1..v.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// Mappings of `(first page, pages)` mapped, looked up and unmapped in random orders, each
/// to random guest pages with R or RW.
fn workload_of(rng: &mut Rng, ranges: Vec<(u64, u64)>) -> Workload {
    let order = shuffled(rng, ranges.clone());
    let maps = order
        .iter()
        .map(|&(p, n)| {
            let perm = if rng.next().is_multiple_of(2) {
                Perm::READ
            } else {
                Perm::RW
            };
            (p, n, rng.next() % (GUEST_PAGES - n), perm)
        })
        .collect();
    let lookups = shuffled(rng, ranges.clone())
        .into_iter()
        .map(|(p, n)| ((p + rng.next() % n) << 12) | (rng.next() & 0xff8))
        .collect();
    let unmaps = shuffled(rng, ranges)
        .into_iter()
        .map(|(p, n)| (p, p + n - 1))
        .collect();
    Workload {
        maps,
        lookups,
        unmaps,
    }
}

/// The dense layout: 2^20 single pages filling a 4 GiB window.
fn workload() -> Workload {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    workload_of(
        &mut rng,
        (0..N as u64).map(|i| (IOVA_BASE_PAGE + i, 1)).collect(),
    )
}

/// Every layout, with its name.
fn layouts() -> Vec<(&'static str, Workload)> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let strided = |rng: &mut Rng, n: u64, stride: u64| {
        workload_of(
            rng,
            (0..n).map(|i| (IOVA_BASE_PAGE + i * stride, 1)).collect(),
        )
    };
    // Linux's allocator: sizes mostly one page, some up to 64; each range aligned to its size
    // rounded up to a power of two, below the previous one (top-down from 4 GiB).
    let mut top = (4u64 << 30) >> 12;
    let mut linux = Vec::new();
    for _ in 0..(1 << 16) {
        let n = match rng.next() % 16 {
            0..=9 => 1,
            10..=12 => 1 + rng.next() % 4,
            13 | 14 => 1 + rng.next() % 16,
            _ => 1 + rng.next() % 64,
        };
        let align = n.next_power_of_two();
        top = (top - n) & !(align - 1);
        linux.push((top, n));
    }
    vec![
        ("dense", workload()),
        ("1 page in 8", strided(&mut rng, 1 << 17, 8)),
        ("1 page per 2 MiB", strided(&mut rng, 1 << 14, 512)),
        ("1 page per 1 GiB", strided(&mut rng, 1 << 12, 1 << 18)),
        ("Linux-like top-down", workload_of(&mut rng, linux)),
    ]
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
    let pages = w.pages() as f64;
    for _ in 0..3 {
        let before = ALLOCATED.load(Ordering::Relaxed);
        let mut m = M::default();
        let t = Instant::now();
        for &(p, n, g, perm) in &w.maps {
            assert!(m.map(p, p + n - 1, g, perm));
        }
        let map = t.elapsed();
        best.bytes_per_page = (ALLOCATED.load(Ordering::Relaxed) - before) as f64 / pages;
        let t = Instant::now();
        let mut sum = 0u64;
        for &iova in &w.lookups {
            sum = sum.wrapping_add(m.translate(iova).unwrap_or(1));
        }
        let translate = t.elapsed();
        black_box(sum);
        let t = Instant::now();
        for &(first, last) in &w.unmaps {
            assert!(m.unmap(first, last));
        }
        let unmap = t.elapsed();
        let per = |d: Duration, ops: usize| d.as_nanos() as f64 / ops as f64;
        best.map_ns = best.map_ns.min(per(map, w.maps.len()));
        best.translate_ns = best.translate_ns.min(per(translate, w.lookups.len()));
        best.unmap_ns = best.unmap_ns.min(per(unmap, w.unmaps.len()));
    }
    println!(
        "  {:<22} {:>9.2} bytes/page  map {:>6.1} ns  translate {:>6.1} ns  unmap {:>6.1} ns",
        M::NAME,
        best.bytes_per_page,
        best.map_ns,
        best.translate_ns,
        best.unmap_ns
    );
    best
}

fn summary() {
    println!("mapping layouts (ns per operation, best of 3 runs)");
    for (name, w) in layouts() {
        println!(
            "{name}: {} mappings, {} pages, IOVA span {} MiB",
            w.maps.len(),
            w.pages(),
            {
                let lo = w.maps.iter().map(|m| m.0).min().unwrap_or(0);
                let hi = w.maps.iter().map(|m| m.0 + m.1).max().unwrap_or(0);
                (hi - lo) >> 8
            }
        );
        let ours = measure::<IoPageTable>(&w);
        let base = measure::<BTreeBaseline>(&w);
        println!(
            "  ratio (baseline / ours): memory {:.2}x  map {:.1}x  translate {:.1}x  unmap {:.1}x",
            base.bytes_per_page / ours.bytes_per_page,
            base.map_ns / ours.map_ns,
            base.translate_ns / ours.translate_ns,
            base.unmap_ns / ours.unmap_ns
        );
    }
}

fn built<M: Mappings>(w: &Workload) -> M {
    let mut m = M::default();
    for &(p, n, g, perm) in &w.maps {
        m.map(p, p + n - 1, g, perm);
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
                for &(p, n, gpa, perm) in &w.maps {
                    m.map(p, p + n - 1, gpa, perm);
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
                for &(first, last) in &w.unmaps {
                    m.unmap(first, last);
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
