//! The emulated PCI function of a passthrough device, against a fake backend.

use super::testing::function;
use super::*;

#[test]
fn bars_are_powers_of_two_and_a_region_too_large_for_one_is_refused() {
    let f = function(0x1800, 2).unwrap();
    let bars = f.config().bars();
    assert!(bars.contains(&(0, 0xc000_0000, 0x2000)), "{bars:?}");
    // A server that claims a region larger than half the 64-bit space: no BAR can hold it.
    let e = function((1 << 63) + 1, 0).err().unwrap().to_string();
    assert!(
        e.contains("BAR 0: the server's region size 0x8000000000000001 is too large"),
        "{e}"
    );
}

/// A saved state that does not fit (a vector count of another size), together with a
/// changed register, is refused, and the function keeps every register as it was.
#[test]
fn a_state_that_does_not_fit_leaves_the_function_as_it_was() {
    let mut f = function(0x1000, 2).unwrap();
    let before = Persist::save(&mut f).unwrap();
    let mut st = before.clone();
    st.config[1] ^= 0x2; // memory decoding on
    if let Some(m) = st.msix.as_mut() {
        m.entries.push((0, 0, 0, 0));
    }
    let e = Persist::restore(&mut f, &st).err().unwrap();
    assert!(matches!(e, StateError::Mismatch(..)), "{e}");
    let after = Persist::save(&mut f).unwrap();
    assert_eq!(after.config, before.config);
    // The same register change alone is taken.
    st.msix = before.msix.clone();
    Persist::restore(&mut f, &st).unwrap();
    assert_eq!(Persist::save(&mut f).unwrap().config, st.config);
}
