use super::*;
use std::sync::atomic::AtomicUsize;

/// A port device answering reads with `0x5a` and recording writes.
#[derive(Default)]
struct Port {
    written: Vec<(u64, Vec<u8>)>,
}

impl devices::bus::BusDevice for Port {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.written.push((offset, data.to_vec()));
    }
}

fn context() -> (VcpuContext, Arc<Mutex<Port>>) {
    let port = Arc::new(Mutex::new(Port::default()));
    let pio = Bus::new();
    pio.insert(port.clone(), 0x3f8, 8).unwrap();
    let mmio = Bus::new();
    mmio.insert(port.clone(), 0xd000_0000, 0x1000).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
    let ctx = VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        exit: Arc::new(VmExit::new().unwrap()),
        stop: AtomicBool::new(false),
        mem: Arc::new(mem),
        quirks: HostQuirks::None,
        pause: PauseControl::default(),
        msr_indices: Vec::new(),
        xsave_size: 0,
    };
    (ctx, port)
}

/// What an action says, comparable.
fn outcome(a: Action) -> Result<(), Option<ExitReason>> {
    match a {
        Action::Continue => Ok(()),
        Action::Exit(r) => Err(Some(r)),
        Action::EmulationFailure => Err(None),
    }
}

fn error_containing(a: Action, needle: &str) {
    match outcome(a) {
        Err(Some(ExitReason::Error(e))) => assert!(e.contains(needle), "{e}"),
        other => panic!("{other:?}, expected an error with {needle:?}"),
    }
}

/// Port and MMIO exits reach the device at their offset; reads nobody serves read as
/// all ones, writes nobody serves are dropped; the guest runs on either way.
#[test]
fn io_exits_go_to_the_buses_and_unserved_reads_read_ones() {
    let (ctx, port) = context();
    let mut data = [0u8; 2];
    assert_eq!(
        outcome(handle_exit(&ctx, VcpuExit::IoIn(0x3f9, &mut data))),
        Ok(())
    );
    assert_eq!(data, [0x5a, 0x5a]);
    let mut data = [0u8; 4];
    assert_eq!(
        outcome(handle_exit(&ctx, VcpuExit::IoIn(0x80, &mut data))),
        Ok(())
    );
    assert_eq!(data, [0xff; 4]);
    let mut data = [0u8; 8];
    let read = VcpuExit::MmioRead(0xd000_0010, &mut data);
    assert_eq!(outcome(handle_exit(&ctx, read)), Ok(()));
    assert_eq!(data, [0x5a; 8]);
    let mut data = [0u8; 4];
    let read = VcpuExit::MmioRead(0xe000_0000, &mut data);
    assert_eq!(outcome(handle_exit(&ctx, read)), Ok(()));
    assert_eq!(data, [0xff; 4]);
    for exit in [
        VcpuExit::IoOut(0x3fb, &[1]),
        VcpuExit::IoOut(0x80, &[2]),
        VcpuExit::MmioWrite(0xd000_0020, &[3, 4]),
        VcpuExit::MmioWrite(0xe000_0000, &[5]),
    ] {
        assert_eq!(outcome(handle_exit(&ctx, exit)), Ok(()));
    }
    assert_eq!(
        port.lock().unwrap().written,
        vec![(3, vec![1]), (0x20, vec![3, 4])]
    );
}

/// How each exit that ends or stops the guest is reported (KVM's `kvm_run` exit
/// reasons and system events, linux/kvm.h).
#[test]
fn exits_that_end_the_guest_say_why() {
    let (ctx, _) = context();
    let h = |e| outcome(handle_exit(&ctx, e));
    assert_eq!(h(VcpuExit::Hlt), Err(Some(ExitReason::PowerOff)));
    assert_eq!(
        h(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[])),
        Err(Some(ExitReason::PowerOff))
    );
    assert_eq!(
        h(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[])),
        Err(Some(ExitReason::Reset))
    );
    assert_eq!(
        h(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[])),
        Err(Some(ExitReason::Error("the guest crashed".into())))
    );
    error_containing(
        handle_exit(&ctx, VcpuExit::SystemEvent(99, &[])),
        "unexpected KVM system event 99",
    );
    error_containing(handle_exit(&ctx, VcpuExit::Shutdown), "triple-faulted");
    error_containing(
        handle_exit(&ctx, VcpuExit::FailEntry(0x21, 3)),
        "could not enter the guest on CPU 3 (hardware reason 0x21)",
    );
    error_containing(
        handle_exit(&ctx, VcpuExit::Debug(Default::default())),
        "unexpected vCPU exit",
    );
    // An emulation failure goes to the fallback; a signal's exit just runs again.
    assert_eq!(h(VcpuExit::InternalError), Err(None));
    assert_eq!(h(VcpuExit::Intr), Ok(()));
}

/// A thread that `kill` only counts (a vCPU thread's kick).
struct Kicked(Arc<AtomicUsize>);

// SAFETY: `kill` is overridden, so the handle is never used.
unsafe impl Killable for Kicked {
    fn pthread_handle(&self) -> libc::pthread_t {
        unreachable!("kill is overridden")
    }
    fn kill(&self, num: libc::c_int) -> vmm_sys_util::errno::Result<()> {
        assert_eq!(num, kick_signal());
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// `pause` asks, kicks the threads until all of them parked, and then returns true;
/// `resume` withdraws the request. A VM that ends meanwhile ends the wait (false).
#[test]
fn pause_kicks_until_every_thread_parked_and_resume_lets_them_go() {
    let pause = Arc::new(PauseControl::default());
    let kicks = Arc::new(AtomicUsize::new(0));
    let stop = AtomicBool::new(false);
    // Two "vCPU threads" that park once they were kicked (as KVM_RUN returns on the
    // signal), then wait for the resume.
    let parkers: Vec<_> = (0..2)
        .map(|_| {
            let (pause, kicks) = (pause.clone(), kicks.clone());
            std::thread::spawn(move || {
                while !pause.requested() || kicks.load(Ordering::SeqCst) == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                *pause.parked.locked() += 1;
                pause.changed.notify_all();
                while pause.requested() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                *pause.parked.locked() -= 1;
            })
        })
        .collect();
    let threads = [Kicked(kicks.clone()), Kicked(kicks.clone())];
    assert!(!pause.requested());
    assert!(pause.pause(&threads, 2, &stop));
    assert!(pause.requested());
    assert_eq!(*pause.parked.locked(), 2);
    assert!(kicks.load(Ordering::SeqCst) >= 2);
    pause.resume();
    assert!(!pause.requested());
    for p in parkers {
        p.join().unwrap();
    }
    assert_eq!(*pause.parked.locked(), 0);

    // Nobody parks, and the VM ends: the wait ends with false.
    let stop = AtomicBool::new(true);
    assert!(!pause.pause(&threads, 1, &stop));
    pause.resume();
}

/// The kick is a real-time signal: the standard ones mean something else to the process
/// (SIGHUP, say, ends it when its terminal goes), and real-time ones queue.
#[test]
fn the_kick_is_a_real_time_signal() {
    let s = kick_signal();
    assert!(
        (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&s),
        "signal {s}"
    );
}
