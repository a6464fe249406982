// SPDX-License-Identifier: GPL-2.0
/*
 * vmm_nettest: frames through the first virtio-net device (the vmm project's vhost-user net
 * device), looped back by its back end (DPDK testpmd, --forward-mode=macswap), every byte
 * checked. KTAP on the console; the result goes to the VM's verdict (vmm_verdict.c).
 *
 * Frames are 60 to 1514 bytes, of ethertype 0x88b5 (local experimental), addressed to
 * 02:00:00:00:00:01. Each carries its sequence number and size, then a pattern that depends on
 * the sequence number. Every third frame of 128 bytes or more is sent as a chain: a short
 * linear part and two page fragments, which virtio-net puts in separate descriptors when the
 * device has VIRTIO_NET_F_CSUM (scatter-gather). Frames go in bursts; a frame that does not
 * come back is a drop (DPDK drops a frame whose receive buffer misses in its device IOTLB):
 * drops are counted and printed, and the suite sends until `frames` frames came back intact
 * or it has sent three times as many.
 *
 * Parameters (kernel command line, vmm_nettest.<name>=):
 *   frames     frames that must come back intact (default 10000; 0 skips the suite)
 *   burst      frames sent before waiting for them (default 16)
 *   exit_vm    end the VM with the verdict when done (default 1)
 *   required   without a virtio-net device, report a failure (default 0)
 */

#include <linux/bitmap.h>
#include <linux/delay.h>
#include <linux/etherdevice.h>
#include <linux/iommu.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/netdevice.h>
#include <linux/rtnetlink.h>
#include <linux/skbuff.h>
#include <linux/slab.h>
#include <linux/unaligned.h>
#include <linux/vmalloc.h>
#include <linux/wait.h>

#include "vmm_tests.h"

#define ETH_P_VMMTEST	0x88b5
#define HDR_LEN		(ETH_HLEN + 8)	/* Ethernet header, seq (le32), size (le16), pad */
#define MAX_FRAME	1514
#define SHIFTS		251		/* pattern offsets: frames close in sequence differ */
#define CHAIN_HEAD	64

static uint frames = 10000;
module_param(frames, uint, 0444);
static uint burst = 16;
module_param(burst, uint, 0444);
static bool exit_vm = true;
module_param(exit_vm, bool, 0444);
static bool required;
module_param(required, bool, 0444);

static const u8 peer_mac[ETH_ALEN] = { 0x02, 0, 0, 0, 0, 1 };
static const u16 sizes[] = { 60, 61, 64, 100, 128, 255, 256, 511, 512, 1000, 1023, 1024,
			     1400, 1513, 1514 };

struct nt {
	struct net_device *dev;
	struct packet_type pt;
	u8 *pattern;		/* MAX_FRAME + SHIFTS bytes */
	unsigned long *seen;	/* sequence numbers that came back intact */
	unsigned long *chained;	/* sequence numbers sent as chains */
	u32 max_seq;
	wait_queue_head_t wq;
	atomic_t received, corrupt, stray, dup;
	atomic64_t bytes;
	u32 sent, xmit_err, chains_sent;
};

static struct nt *the_nt;

/* The payload of frame `seq` starts at pattern + seq % SHIFTS. */
static const u8 *nt_payload(struct nt *t, u32 seq)
{
	return t->pattern + seq % SHIFTS;
}

/* Checks a frame that came back (softirq context). */
static int nt_rx(struct sk_buff *skb, struct net_device *dev, struct packet_type *pt,
		 struct net_device *orig)
{
	struct nt *t = container_of(pt, struct nt, pt);
	const struct ethhdr *eth;
	const u8 *body;
	u32 seq, len;
	u16 size;

	if (skb_linearize(skb))
		goto stray;
	eth = eth_hdr(skb);
	body = skb->data;
	len = skb->len; /* after the Ethernet header */
	if (len < 8 || !ether_addr_equal(eth->h_dest, dev->dev_addr) ||
	    !ether_addr_equal(eth->h_source, peer_mac))
		goto stray;
	seq = get_unaligned_le32(body);
	size = get_unaligned_le16(body + 4);
	if (seq >= t->max_seq) {
		atomic_inc(&t->corrupt);
		goto out;
	}
	if (size != len + ETH_HLEN || size < 60 || size > MAX_FRAME ||
	    !vmm_same(body + 8, nt_payload(t, seq), size - HDR_LEN)) {
		atomic_inc(&t->corrupt);
		goto out;
	}
	if (test_and_set_bit(seq, t->seen)) {
		atomic_inc(&t->dup);
		goto out;
	}
	atomic_inc(&t->received);
	atomic64_add(size, &t->bytes);
	wake_up(&t->wq);
	goto out;
stray:
	atomic_inc(&t->stray);
out:
	consume_skb(skb);
	return NET_RX_SUCCESS;
}

/* Frame `seq` of `size` bytes; as a chain (linear head and two page fragments) if asked. */
static struct sk_buff *nt_frame(struct nt *t, u32 seq, unsigned int size, bool chain)
{
	struct net_device *dev = t->dev;
	unsigned int head = chain ? CHAIN_HEAD : size, off, i;
	struct sk_buff *skb;
	u8 *p;

	skb = alloc_skb(LL_RESERVED_SPACE(dev) + head, GFP_KERNEL);
	if (!skb)
		return NULL;
	skb_reserve(skb, LL_RESERVED_SPACE(dev));
	p = skb_put(skb, head);
	ether_addr_copy(p, peer_mac);
	ether_addr_copy(p + ETH_ALEN, dev->dev_addr);
	put_unaligned_be16(ETH_P_VMMTEST, p + 2 * ETH_ALEN);
	put_unaligned_le32(seq, p + ETH_HLEN);
	put_unaligned_le16(size, p + ETH_HLEN + 4);
	put_unaligned_le16(0, p + ETH_HLEN + 6);
	vmm_copy(p + HDR_LEN, nt_payload(t, seq), head - HDR_LEN);
	off = head;
	for (i = 0; chain && i < 2; i++) {
		unsigned int len = i == 0 ? (size - head) / 2 : size - off;
		struct page *pg = alloc_page(GFP_KERNEL);

		if (!pg) {
			kfree_skb(skb);
			return NULL;
		}
		vmm_copy(page_address(pg), nt_payload(t, seq) + off - HDR_LEN, len);
		skb_fill_page_desc(skb, i, pg, 0, len);
		skb->len += len;
		skb->data_len += len;
		skb->truesize += PAGE_SIZE;
		off += len;
	}
	skb->dev = dev;
	skb->protocol = htons(ETH_P_VMMTEST);
	skb_reset_mac_header(skb);
	skb_reset_network_header(skb);
	return skb;
}

static bool nt_burst_back(struct nt *t, u32 from, u32 to)
{
	return find_next_zero_bit(t->seen, to, from) >= to;
}

static void nt_report(unsigned int n, const char *name, int err, const char *why)
{
	if (err > 0)
		pr_info("ok %u %s # SKIP %s\n", n, name, why);
	else if (!err)
		pr_info("ok %u %s\n", n, name);
	else
		pr_info("not ok %u %s # %s\n", n, name, why);
}

static unsigned int nt_run(struct nt *t)
{
	struct device *dma = t->dev->dev.parent ? t->dev->dev.parent->parent : NULL;
	struct iommu_domain *dom = dma ? iommu_get_domain_for_dev(dma) : NULL;
	bool iommu = dom && dom->type != IOMMU_DOMAIN_IDENTITY;
	bool lazy = dom && dom->type == IOMMU_DOMAIN_DMA_FQ;
	bool sg = t->dev->features & NETIF_F_SG;
	unsigned int failed = 0, n = 0, k, chains_back = 0;
	u32 seq, from, drops;
	u64 t0, ms, bytes;
	int err;

	pr_info("KTAP version 1\n");
	pr_info("# vmm_nettest: %s (%s), %s, frames=%u burst=%u, chains %s\n", t->dev->name,
		dma ? dev_name(dma) : "?",
		iommu ? (lazy ? "behind an IOMMU, lazy invalidation" :
				"behind an IOMMU, strict invalidation") : "no IOMMU",
		frames, burst, sg ? "on (scatter-gather)" : "off (no scatter-gather)");
	pr_info("1..3\n");

	rtnl_lock();
	err = dev_open(t->dev, NULL);
	rtnl_unlock();
	for (k = 0; !err && !netif_carrier_ok(t->dev) && k < 1000; k++)
		msleep(10);
	err = err ? err : (netif_carrier_ok(t->dev) ? 0 : -ENOLINK);
	nt_report(++n, "link_up", err ? -1 : 0, "the interface did not come up with carrier");
	if (err) {
		nt_report(++n, "frames", -1, "no link");
		nt_report(++n, "chains", -1, "no link");
		return 3;
	}

	dev_add_pack(&t->pt);
	t0 = ktime_get_ns();
	for (seq = 0; atomic_read(&t->received) < frames && seq < t->max_seq;) {
		from = seq;
		for (k = 0; k < burst && seq < t->max_seq; k++, seq++) {
			unsigned int size = sizes[seq % ARRAY_SIZE(sizes)];
			bool chain = sg && size >= 128 && seq % 3 == 0;
			struct sk_buff *skb = nt_frame(t, seq, size, chain);

			t->sent++;
			if (!skb || dev_queue_xmit(skb) != NET_XMIT_SUCCESS) {
				t->xmit_err++;
				continue;
			}
			if (chain) {
				set_bit(seq, t->chained);
				t->chains_sent++;
			}
		}
		/* Wait for the burst while frames keep coming back. */
		for (;;) {
			int before = atomic_read(&t->received);

			if (wait_event_timeout(t->wq, nt_burst_back(t, from, seq),
					       msecs_to_jiffies(100)))
				break;
			if (atomic_read(&t->received) == before)
				break;
		}
		if (seq % 2000 < burst)
			pr_info("# net: %d of %u frames back after %u sent\n",
				atomic_read(&t->received), frames, seq);
	}
	ms = (ktime_get_ns() - t0) / NSEC_PER_MSEC;
	dev_remove_pack(&t->pt);

	drops = t->sent - atomic_read(&t->received);
	bytes = atomic64_read(&t->bytes);
	for (k = 0; k < seq; k++)
		if (test_bit(k, t->chained) && test_bit(k, t->seen))
			chains_back++;
	pr_info("# net: sent=%u received=%u dropped=%u corrupt=%d stray=%d duplicate=%d xmit_errors=%u chains_sent=%u chains_received=%u bytes=%llu ms=%llu\n",
		t->sent, atomic_read(&t->received), drops, atomic_read(&t->corrupt),
		atomic_read(&t->stray), atomic_read(&t->dup), t->xmit_err, t->chains_sent,
		chains_back, bytes, ms);
	pr_info("# net throughput: %llu frames/s, %llu.%02llu MB/s (%s)\n",
		ms ? (u64)atomic_read(&t->received) * 1000 / ms : 0,
		ms ? bytes / 1000 / ms : 0, ms ? (bytes / 10 / ms) % 100 : 0,
		iommu ? (lazy ? "vIOMMU lazy" : "vIOMMU strict") : "no IOMMU");
	if (drops)
		pr_info("# net: %u frame(s) did not come back (dropped by the back end or lost)\n",
			drops);

	err = atomic_read(&t->received) >= frames && !atomic_read(&t->corrupt) ? 0 : -1;
	failed += err ? 1 : 0;
	nt_report(++n, "frames", err,
		  atomic_read(&t->corrupt) ? "frames came back corrupted" :
					     "too few frames came back");
	if (!sg) {
		nt_report(++n, "chains", 1, "the device has no scatter-gather (VIRTIO_NET_F_CSUM)");
	} else {
		err = chains_back > 0 ? 0 : -1;
		failed += err ? 1 : 0;
		nt_report(++n, "chains", err, "no chained frame came back");
	}
	return failed;
}

/* After deferred probes (the virtio-iommu's endpoints probe late). */
static int __init nt_init(void)
{
	struct net_device *dev;
	struct nt *t;
	unsigned int failed, i;
	struct net_device *found = NULL;

	if (!frames)
		return 0;
	rtnl_lock();
	for_each_netdev(&init_net, dev) {
		if (dev->dev.parent && dev->dev.parent->driver &&
		    !strcmp(dev->dev.parent->driver->name, "virtio_net")) {
			found = dev;
			dev_hold(found);
			break;
		}
	}
	rtnl_unlock();
	dev = found;
	if (!dev) {
		if (required) {
			pr_info("KTAP version 1\n1..1\nnot ok 1 probe # no virtio-net device\n");
			vmm_tests_done("vmm_nettest", 1, exit_vm);
		}
		return 0;
	}
	t = kzalloc(sizeof(*t), GFP_KERNEL);
	if (!t)
		goto nomem;
	t->dev = dev;
	t->max_seq = frames * 3;
	t->pattern = kmalloc(MAX_FRAME + SHIFTS, GFP_KERNEL);
	t->seen = bitmap_zalloc(t->max_seq, GFP_KERNEL);
	t->chained = bitmap_zalloc(t->max_seq, GFP_KERNEL);
	if (!t->pattern || !t->seen || !t->chained)
		goto nomem;
	for (i = 0; i < MAX_FRAME + SHIFTS; i++)
		t->pattern[i] = (u8)(i * 31 + (i >> 8) + 7);
	init_waitqueue_head(&t->wq);
	t->pt.type = htons(ETH_P_VMMTEST);
	t->pt.dev = dev;
	t->pt.func = nt_rx;
	the_nt = t;
	failed = nt_run(t);
	vmm_tests_done("vmm_nettest", failed, exit_vm);
	return 0;
nomem:
	pr_info("KTAP version 1\n1..1\nnot ok 1 setup # out of memory\n");
	vmm_tests_done("vmm_nettest", 1, exit_vm);
	return 0;
}
late_initcall_sync(nt_init);

MODULE_DESCRIPTION("Frame loopback suite for the vmm project's vhost-user net device");
MODULE_LICENSE("GPL");
