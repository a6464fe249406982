/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared by the vmm project's guest test suites (vmm_dmatest, vmm_nettest): bulk memory
 * helpers that stay cheap in KVM's instruction emulator, and the VM's verdict.
 */
#ifndef VMM_TESTS_H
#define VMM_TESTS_H

#include <linux/types.h>

/*
 * Bulk memory helpers. On PVM hosts this code runs in KVM's instruction emulator, which
 * executes a string instruction one element at a time, a loop one instruction at a time: the
 * bulk goes as 8-byte string elements, the tail as bytes.
 */
static inline bool vmm_same(const void *a, const void *b, size_t n)
{
	size_t left = n / 8;
	u8 eq = 1;

	if (left)
		asm volatile("repe cmpsq\n\tsete %0"
			     : "=r"(eq), "+c"(left), "+S"(a), "+D"(b)
			     :
			     : "memory", "cc");
	if (!eq)
		return false;
	left = n % 8;
	if (left)
		asm volatile("repe cmpsb\n\tsete %0"
			     : "=r"(eq), "+c"(left), "+S"(a), "+D"(b)
			     :
			     : "memory", "cc");
	return eq;
}

static inline bool vmm_all(const void *p, u8 v, size_t n)
{
	size_t left = n / 8;
	u8 eq = 1;

	if (left)
		asm volatile("repe scasq\n\tsete %0"
			     : "=r"(eq), "+c"(left), "+D"(p)
			     : "a"(v * 0x0101010101010101ULL)
			     : "memory", "cc");
	if (!eq)
		return false;
	left = n % 8;
	if (left)
		asm volatile("repe scasb\n\tsete %0"
			     : "=r"(eq), "+c"(left), "+D"(p)
			     : "a"(v)
			     : "memory", "cc");
	return eq;
}

static inline void vmm_set(void *p, u8 v, size_t n)
{
	size_t q = n / 8, b = n % 8;

	asm volatile("rep stosq\n\tmov %3, %%rcx\n\trep stosb"
		     : "+c"(q), "+D"(p)
		     : "a"(v * 0x0101010101010101ULL), "r"(b)
		     : "memory");
}

static inline void vmm_copy(void *dst, const void *src, size_t n)
{
	size_t q = n / 8, b = n % 8;

	asm volatile("rep movsq\n\tmov %3, %%rcx\n\trep movsb"
		     : "+c"(q), "+D"(dst), "+S"(src)
		     : "r"(b)
		     : "memory");
}

/*
 * The VM's verdict: each suite that ran reports its failures (and whether it may end the
 * VM); after every suite (late_initcall_sync, linked last), the verdict is written to the
 * VMM's test-exit port (0x604) as the number of failed cases, at most 255.
 */
void vmm_tests_done(const char *suite, unsigned int failed, bool exit_vm);

#endif
