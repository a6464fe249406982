//! The control queue (virtio 1.3 section 5.1.6.5), served by the VMM: with more than one
//! queue pair the driver sets how many it uses (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`), and the
//! VMM starts or stops the back end's rings to match. Other classes are not offered and get
//! `VIRTIO_NET_ERR`.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::QueueT;
use vm_memory::GuestMemory;

use super::VhostUserNet;
use crate::virtio::iova::IovaMemory;

impl VhostUserNet {
    /// Handles every command queued on the control queue.
    pub(super) fn process_ctrl(&mut self) {
        let shared = self.shared.clone();
        match &shared.iommu {
            Some((h, ep)) => {
                let mem = IovaMemory::new(shared.mem.clone(), h.clone(), *ep);
                self.process_ctrl_in(&mem);
            }
            None => self.process_ctrl_in(shared.mem.as_ref()),
        }
    }

    fn process_ctrl_in<M: GuestMemory>(&mut self, mem: &M) {
        let Some(qi) = self.ctrl_queue() else {
            return;
        };
        let mut used_any = false;
        loop {
            let Some(q) = self.queues.get_mut(qi) else {
                return;
            };
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            // struct virtio_net_ctrl_hdr { u8 class; u8 command; }, then the command's data;
            // the device writes one ack byte.
            let ack = match chain.clone().reader(mem) {
                Ok(mut r) => match r.read_obj::<[u8; 2]>() {
                    Ok([class, cmd]) => self.ctrl_command(class, cmd, &mut r),
                    Err(_) => VIRTIO_NET_ERR as u8,
                },
                Err(_) => VIRTIO_NET_ERR as u8,
            };
            let written = match chain.writer(mem) {
                Ok(mut w) => u32::from(w.write_obj(ack).is_ok()),
                Err(_) => 0,
            };
            self.shared
                .counters
                .ctrl_commands
                .fetch_add(1, Ordering::Relaxed);
            if let Some(q) = self.queues.get_mut(qi) {
                if q.add_used(mem, head, written).is_err() {
                    break;
                }
            }
            used_any = true;
        }
        if used_any {
            if let Some(i) = &self.interrupt {
                i.signal_queue(qi as u16);
            }
        }
    }

    fn ctrl_command<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        class: u8,
        cmd: u8,
        r: &mut virtio_queue::Reader<'_, B>,
    ) -> u8 {
        if u32::from(class) != VIRTIO_NET_CTRL_MQ
            || u32::from(cmd) != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
        {
            return VIRTIO_NET_ERR as u8;
        }
        let Ok(n) = r.read_obj::<u16>().map(u16::from_le) else {
            return VIRTIO_NET_ERR as u8;
        };
        // 5.1.6.5.5: "virtqueue_pairs ... between 1 and max_virtqueue_pairs".
        if n == 0 || n > self.pairs {
            return VIRTIO_NET_ERR as u8;
        }
        if n > self.active_pairs {
            self.start_pairs(self.active_pairs, n);
        } else if n < self.active_pairs {
            self.stop_pairs(n, self.active_pairs);
        }
        self.active_pairs = n;
        VIRTIO_NET_OK as u8
    }

    /// Stops the rings of pairs `[from, to)` and drops them from the replay plan.
    fn stop_pairs(&mut self, from: u16, to: u16) {
        let rings: Vec<usize> = (2 * usize::from(from)..2 * usize::from(to)).collect();
        let shared = self.shared.clone();
        let mut st = shared.lock();
        if let Some(p) = st.plan.as_mut() {
            p.rings.retain(|r| !rings.contains(&r.index));
        }
        st.plan_generation += 1;
        shared.stop_rings(&mut st, &rings);
    }
}
