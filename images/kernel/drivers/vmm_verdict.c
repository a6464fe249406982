// SPDX-License-Identifier: GPL-2.0
/*
 * vmm_verdict: the VM's verdict for the vmm project's guest test suites. Each suite that ran
 * reports its number of failed cases with vmm_tests_done(); after all of them (this file is
 * linked last, so its late_initcall_sync runs after theirs) the total, at most 255, is
 * written to the VMM's test-exit port (I/O port 0x604), which ends the VM with that exit
 * status. A suite that ran with exit_vm=0 leaves the VM running.
 */

#include <linux/init.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/printk.h>

#include "vmm_tests.h"

#define TEST_EXIT_PORT	0x604

static unsigned int suites, failures;
static bool exit_requested;

void vmm_tests_done(const char *suite, unsigned int failed, bool exit_vm)
{
	suites++;
	failures += failed;
	exit_requested |= exit_vm;
	pr_info("# %s: %u failed\n", suite, failed);
}

static int __init vmm_verdict(void)
{
	if (!suites || !exit_requested)
		return 0;
	pr_info("# vmm verdict: %u suite(s), %u failed case(s)\n", suites, failures);
	outl(min(failures, 255u), TEST_EXIT_PORT);
	return 0;
}
late_initcall_sync(vmm_verdict);
