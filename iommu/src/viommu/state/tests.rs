//! Saving and restoring the vIOMMU: host mappings recreated, refusals, versions.

use crate::protocol::*;
use crate::testing::{attach, map, unmap};
use crate::testing::{send, with_backend, R, RW};
use crate::viommu::*;

#[test]
fn save_and_restore_recreate_host_mappings() {
    let (mut a, log_a) = with_backend(BackendCaps::default());
    send(&mut a, &attach(1, 8, 0));
    send(&mut a, &attach(2, 1, 0));
    send(&mut a, &map(1, 0x10000, 0x13fff, 0x200000, RW));
    send(&mut a, &map(1, 0x20000, 0x20fff, 0x300000, R));
    send(&mut a, &map(2, 0x0, 0xfff, 0x1000, RW));
    let saved = a.save_state();
    // Through JSON, as a snapshot would.
    let json = serde_json::to_string(&saved).unwrap();
    let saved: ViommuState = serde_json::from_str(&json).unwrap();

    let (mut b, log_b) = with_backend(BackendCaps::default());
    b.restore_state(&saved).unwrap();
    assert_eq!(
        log_b.lock().unwrap().host_pages(),
        log_a.lock().unwrap().host_pages()
    );
    assert_eq!(b.endpoint_domain(8), Some(1));
    assert_eq!(b.endpoint_domain(1), Some(2));
    let mut out = Vec::new();
    b.translate(1, 0x0800, 8, Access::Write, &mut out).unwrap();
    assert_eq!(out, vec![(0x1800, 8)]);
    // Mapping boundaries survive: a partial UNMAP of the 4-page mapping is refused the
    // same way on both sides (the spec's "split" rule).
    assert_eq!(
        send(&mut a, &unmap(1, 0x10000, 0x10fff)),
        send(&mut b, &unmap(1, 0x10000, 0x10fff))
    );
    assert_eq!(send(&mut b, &unmap(1, 0x10000, 0x13fff)), Some(Status::Ok));
    assert_eq!(log_b.lock().unwrap().host_pages().len(), 1);
}

#[test]
fn a_corrupt_state_changes_nothing() {
    let (mut a, log) = with_backend(BackendCaps::default());
    send(&mut a, &attach(1, 8, 0));
    send(&mut a, &map(1, 0x10000, 0x10fff, 0x200000, RW));
    let before = log.lock().unwrap().host_pages();
    let mut bad = a.save_state();
    bad.domains[0].mappings.push((0x10, 0x999, 1, 3)); // overlaps
    assert!(matches!(
        a.restore_state(&bad),
        Err(RestoreError::BadMapping(1, 0x10000, 1))
    ));
    let mut unknown = a.save_state();
    unknown.attached.push((0x99, 1));
    assert_eq!(
        a.restore_state(&unknown),
        Err(RestoreError::UnknownEndpoint(0x99))
    );
    let mut old = a.save_state();
    old.version = 99;
    assert_eq!(a.restore_state(&old), Err(RestoreError::Version(99)));
    assert_eq!(log.lock().unwrap().host_pages(), before);
    assert_eq!(a.endpoint_domain(8), Some(1));
}

/// Every check of a restored state, at its edge: the domain count at the limit and one
/// past it, mappings of zero pages, below and above the input range, bad permission
/// bits; features the device does not offer are dropped.
#[test]
fn restore_checks_each_edge() {
    let mut v = Viommu::new(ViommuConfig {
        guest_ram: vec![(0, 1 << 30)],
        max_domains: 2,
        input_range: (0x10000, 0xf_ffff),
        ..Default::default()
    });
    v.add_endpoint(1, None, &[]).unwrap();
    let dom = |id, mappings| DomainState {
        id,
        bypass: false,
        mappings,
    };
    let base = ViommuState {
        version: STATE_VERSION,
        negotiated: 0,
        bypass: false,
        attached: vec![(1, 1)],
        domains: vec![dom(1, vec![(0x10, 0x100, 0xf0, 3)]), dom(2, vec![])],
        faults: vec![],
    };
    assert_eq!(v.restore_state(&base), Ok(()));
    assert_eq!(v.domain_mapped_pages(1), Some(0xf0));
    let mut three = base.clone();
    three.domains.push(dom(3, vec![]));
    assert_eq!(
        v.restore_state(&three),
        Err(RestoreError::TooManyDomains(3))
    );
    for (iova, pages, perm) in [(0x20, 0, 3), (0xf, 1, 3), (0xff, 2, 3), (0x20, 1, 0xf0)] {
        let mut bad = base.clone();
        bad.domains[0].mappings = vec![(iova, 0x100, pages, perm)];
        assert_eq!(
            v.restore_state(&bad),
            Err(RestoreError::BadMapping(1, iova << 12, pages)),
            "{iova:#x}+{pages} perm {perm:#x}"
        );
    }
    // The last page of the input range is fine.
    let mut last = base.clone();
    last.domains[0].mappings = vec![(0xff, 0x100, 1, 1)];
    assert_eq!(v.restore_state(&last), Ok(()));
    let mut features = base.clone();
    features.negotiated = u64::MAX;
    assert_eq!(v.restore_state(&features), Ok(()));
    assert_eq!(v.save_state().negotiated, v.offered_features());
}

#[test]
fn a_refused_host_map_rolls_back() {
    let (mut a, _) = with_backend(BackendCaps::default());
    send(&mut a, &attach(1, 8, 0));
    send(&mut a, &map(1, 0x10000, 0x10fff, 0x200000, RW));
    let saved = a.save_state();
    let (mut b, log) = with_backend(BackendCaps::default());
    log.lock().unwrap().fail_iova = Some(0x10000);
    assert!(matches!(
        b.restore_state(&saved),
        Err(RestoreError::Backend(..))
    ));
    assert_eq!(b.endpoint_domain(8), None);
    assert!(log.lock().unwrap().host_pages().is_empty());
}
