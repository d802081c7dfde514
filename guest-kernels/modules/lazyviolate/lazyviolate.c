// SPDX-License-Identifier: GPL-2.0-only
/*
 * lazyviolate: break the paravirt lazy MMU rules on purpose, so that lazytrace can be shown to catch
 * each kind of violation on a real guest.
 *
 * Every scenario drives lazy MMU mode through exported kernel paths: apply_to_page_range() and
 * apply_to_existing_page_range() (mm/memory.c) on init_mm enter and leave lazy mode at the inlined
 * arch_enter_lazy_mmu_mode()/arch_leave_lazy_mmu_mode() sites of __apply_to_page_range() in vmlinux,
 * and call our callback for each PTE *inside* the lazy region, with no page-table lock held (init_mm
 * takes none). Those vmlinux sites are the ones lazytrace probes. A module's own inline pv-ops calls
 * (arch_enter_lazy_mmu_mode() compiled into this file) would be module-local sites that vmlinux-based
 * probes cannot see, so this module makes none. PTE writes from the callbacks go through
 * set_pte_at() -> pv_ops.mmu.set_pte, i.e. the out-of-line native_set_pte() in vmlinux, which is probed.
 *
 * On a native or KVM guest the lazy-mode pv-ops are NOPs, so nothing below crashes the guest; under
 * Xen PV the "unpaired" scenario would hit the BUG_ON()s in enter_lazy()/leave_lazy()
 * (arch/x86/kernel/paravirt.c). That is why a tracer is needed to see these bugs on ordinary guests.
 *
 * scenario=
 *   apply-kernel   vmalloc() an area and rewrite each of its PTEs with apply_to_page_range(&init_mm)
 *                  from process context with preemption enabled, as vmap_pfn() does (one lazy region per
 *                  PTE table the area spans: one or two for the default 4 pages). A real kernel path:
 *                  lazy mode is entered preemptible (upstream dropped the rule instead: 691ee97e1a9d
 *                  "mm: fix lazy mmu docs and usage", v6.15).
 *   lazy-preempt   the same on the area's first page, but the callback sleeps (msleep) inside the lazy
 *                  region: the task is switched out while its CPU is lazy.
 *   lazy-migrate   on the first page, the callback moves its own task to target_cpu
 *                  (set_cpus_allowed_ptr) inside the lazy region: the region is entered on one CPU and
 *                  left on another.
 *   unpaired       with preemption disabled, the callback of apply_to_existing_page_range() calls
 *                  apply_to_existing_page_range() again: a nested enter, and the outer leave then has no
 *                  open region (the inner leave closed it).
 *   irq-lazy       with preemption disabled, the callback arms a pinned hard-irq hrtimer and waits in
 *                  the lazy region until it fired; the timer callback rewrites a kernel PTE with
 *                  set_pte_at(&init_mm) from interrupt context while its CPU is lazy.
 *
 * init_mm is not exported to modules on these kernels, so the workload passes its address from
 * /proc/kallsyms as init_mm_addr=0x...; the module refuses to run unless sprint_symbol() names that
 * address "init_mm+0x0". apply_to_page_range() only compares the pointer with &init_mm and reads its pgd.
 *
 * Every scenario runs in the module's init function (insmod's process context) and prints one
 * "lazyviolate: scenario=... done" line with what happened (CPUs, pid, counts). If a scenario could not
 * be produced (the timer never fired in the region, the task did not migrate), init fails with an
 * error, so insmod and the workload fail rather than yield a trace that proves nothing.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cpumask.h>
#include <linux/delay.h>
#include <linux/hrtimer.h>
#include <linux/kallsyms.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/pgtable.h>
#include <linux/preempt.h>
#include <linux/sched.h>
#include <linux/smp.h>
#include <linux/string.h>
#include <linux/vmalloc.h>

static char *scenario = "";
module_param(scenario, charp, 0444);
MODULE_PARM_DESC(scenario, "apply-kernel | lazy-preempt | lazy-migrate | unpaired | irq-lazy");

static unsigned long init_mm_addr;
module_param(init_mm_addr, ulong, 0444);
MODULE_PARM_DESC(init_mm_addr, "address of init_mm, from /proc/kallsyms (init_mm is not exported)");

/* &init_mm, checked against kallsyms in lazyviolate_init(). */
static struct mm_struct *kmm;

static unsigned int pages = 4;
module_param(pages, uint, 0444);
MODULE_PARM_DESC(pages, "pages in the vmalloc area whose PTEs are walked (1-512, default 4)");

static unsigned int sleep_ms = 20;
module_param(sleep_ms, uint, 0444);
MODULE_PARM_DESC(sleep_ms, "lazy-preempt: how long to sleep inside the lazy region (default 20)");

static int target_cpu = -1;
module_param(target_cpu, int, 0444);
MODULE_PARM_DESC(target_cpu, "lazy-migrate: CPU to move to inside the lazy region (default: another online CPU)");

static unsigned int timeout_ms = 5000;
module_param(timeout_ms, uint, 0444);
MODULE_PARM_DESC(timeout_ms, "irq-lazy: give up waiting for the timer after this long (default 5000)");

/* The lazy region of one walk, as seen from the callback. */
struct walk {
	unsigned long calls;    /* callback invocations (PTEs visited) */
	int enter_cpu;          /* CPU of the first callback */
	int leave_cpu;          /* CPU of the last callback */
	unsigned int enter_pc;  /* preempt_count() in the first callback */
};

static void walk_note(struct walk *w)
{
	if (!w->calls++) {
		w->enter_cpu = raw_smp_processor_id();
		w->enter_pc = preempt_count();
	}
	w->leave_cpu = raw_smp_processor_id();
}

/* apply-kernel: rewrite each PTE with its own value (the shape of vmap_pfn_apply(), mm/vmalloc.c). */
static int rewrite_pte(pte_t *ptep, unsigned long addr, void *data)
{
	walk_note(data);
	set_pte_at(kmm, addr, ptep, ptep_get(ptep));
	return 0;
}

/* lazy-preempt: sleep once, inside the lazy region. */
static int sleep_in_lazy(pte_t *ptep, unsigned long addr, void *data)
{
	struct walk *w = data;

	walk_note(w);
	if (w->calls == 1)
		msleep(sleep_ms);
	w->leave_cpu = raw_smp_processor_id();
	return 0;
}

/* lazy-migrate: move to target_cpu once, inside the lazy region. */
static int migrate_in_lazy(pte_t *ptep, unsigned long addr, void *data)
{
	struct walk *w = data;
	int err;

	walk_note(w);
	if (w->calls == 1) {
		err = set_cpus_allowed_ptr(current, cpumask_of(target_cpu));
		if (err)
			return err;
	}
	w->leave_cpu = raw_smp_processor_id();
	return 0;
}

/* unpaired: the outer callback walks another page: apply_to_pte_range() nests inside itself. */
struct nest {
	struct walk outer, inner;
	unsigned long inner_addr;
	int inner_err;
};

static int count_pte(pte_t *ptep, unsigned long addr, void *data)
{
	walk_note(data);
	return 0;
}

static int nest_walk(pte_t *ptep, unsigned long addr, void *data)
{
	struct nest *n = data;

	walk_note(&n->outer);
	if (n->outer.calls == 1)
		n->inner_err = apply_to_existing_page_range(kmm, n->inner_addr, PAGE_SIZE, count_pte,
							     &n->inner);
	return n->inner_err;
}

/* irq-lazy: a pinned hard-irq timer rewrites a kernel PTE while the interrupted task's CPU is lazy. */
struct irq_lazy {
	struct hrtimer timer;
	struct walk walk;
	pte_t *ptep;
	unsigned long addr;
	int fired;              /* written by the timer, read by the waiting callback */
	int timer_cpu;
	unsigned int timer_pc;  /* preempt_count() in the timer callback */
	int lazy_cpu;           /* CPU the callback waited on */
};

static struct irq_lazy irq_lazy;

static enum hrtimer_restart irq_lazy_timer(struct hrtimer *t)
{
	struct irq_lazy *s = container_of(t, struct irq_lazy, timer);

	s->timer_cpu = raw_smp_processor_id();
	s->timer_pc = preempt_count();
	set_pte_at(kmm, s->addr, s->ptep, ptep_get(s->ptep));
	smp_store_release(&s->fired, 1);
	return HRTIMER_NORESTART;
}

static int wait_for_irq_in_lazy(pte_t *ptep, unsigned long addr, void *data)
{
	struct irq_lazy *s = data;
	ktime_t deadline;

	walk_note(&s->walk);
	if (s->walk.calls != 1)
		return 0;
	s->ptep = ptep;
	s->addr = addr;
	s->lazy_cpu = raw_smp_processor_id();
	hrtimer_start(&s->timer, ms_to_ktime(1), HRTIMER_MODE_REL_PINNED_HARD);
	deadline = ktime_add_ms(ktime_get(), timeout_ms);
	while (!smp_load_acquire(&s->fired) && ktime_before(ktime_get(), deadline))
		cpu_relax();
	return 0;
}

static int run_apply_kernel(void *area, size_t size)
{
	struct walk w = {};
	int err;

	err = apply_to_page_range(kmm, (unsigned long)area, size, rewrite_pte, &w);
	pr_info("scenario=apply-kernel done: err=%d ptes=%lu cpu=%d pid=%d preempt_count=%#x (in callback)\n",
		err, w.calls, w.enter_cpu, task_pid_nr(current), w.enter_pc);
	return err;
}

static int run_lazy_preempt(void *area, size_t size)
{
	struct walk w = {};
	int err;

	/* One page: one PTE table, so exactly one lazy region (a 4-page area may straddle two). */
	err = apply_to_page_range(kmm, (unsigned long)area, PAGE_SIZE, sleep_in_lazy, &w);
	pr_info("scenario=lazy-preempt done: err=%d ptes=%lu slept=%ums cpu=%d->%d pid=%d preempt_count=%#x\n",
		err, w.calls, sleep_ms, w.enter_cpu, w.leave_cpu, task_pid_nr(current), w.enter_pc);
	return err;
}

static int run_lazy_migrate(void *area, size_t size)
{
	struct walk w = {};
	int err, here = raw_smp_processor_id();

	if (target_cpu < 0) {
		target_cpu = cpumask_any_but(cpu_online_mask, here);
		if (target_cpu >= nr_cpu_ids) {
			pr_err("scenario=lazy-migrate needs two online CPUs\n");
			return -ENODEV;
		}
	}
	if (target_cpu >= nr_cpu_ids || !cpu_online(target_cpu)) {
		pr_err("scenario=lazy-migrate: target_cpu=%d is not online\n", target_cpu);
		return -EINVAL;
	}
	/*
	 * The task stays pinned to target_cpu afterwards (insmod exits there): moving it back would put
	 * its exit's page-table work on the CPU whose lazy region, as the trace sees it, is still open.
	 */
	err = apply_to_page_range(kmm, (unsigned long)area, PAGE_SIZE, migrate_in_lazy, &w);
	pr_info("scenario=lazy-migrate done: err=%d ptes=%lu cpu=%d->%d target=%d pid=%d preempt_count=%#x\n",
		err, w.calls, w.enter_cpu, w.leave_cpu, target_cpu, task_pid_nr(current), w.enter_pc);
	if (!err && w.enter_cpu == w.leave_cpu) {
		pr_err("scenario=lazy-migrate: the task did not move (cpu %d)\n", w.enter_cpu);
		return -EAGAIN;
	}
	return err;
}

static int run_unpaired(void *area, size_t size)
{
	struct nest n = {};
	int err;

	if (size < 2 * PAGE_SIZE) {
		pr_err("scenario=unpaired needs pages >= 2\n");
		return -EINVAL;
	}
	/* The inner walk covers the last page, the outer one the first: two distinct PTEs. */
	n.inner_addr = (unsigned long)area + size - PAGE_SIZE;
	preempt_disable();
	err = apply_to_existing_page_range(kmm, (unsigned long)area, PAGE_SIZE, nest_walk, &n);
	preempt_enable();
	pr_info("scenario=unpaired done: err=%d outer_ptes=%lu inner_ptes=%lu cpu=%d pid=%d preempt_count=%#x\n",
		err, n.outer.calls, n.inner.calls, n.outer.enter_cpu, task_pid_nr(current), n.outer.enter_pc);
	if (!err && n.inner.calls != 1)
		return -EAGAIN;
	return err;
}

static int run_irq_lazy(void *area, size_t size)
{
	struct irq_lazy *s = &irq_lazy;
	int err;

	memset(s, 0, sizeof(*s));
	hrtimer_init(&s->timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL_PINNED_HARD);
	s->timer.function = irq_lazy_timer;
	preempt_disable();
	err = apply_to_existing_page_range(kmm, (unsigned long)area, PAGE_SIZE, wait_for_irq_in_lazy, s);
	preempt_enable();
	hrtimer_cancel(&s->timer);
	pr_info("scenario=irq-lazy done: err=%d fired=%d lazy_cpu=%d timer_cpu=%d timer_preempt_count=%#x pid=%d\n",
		err, s->fired, s->lazy_cpu, s->timer_cpu, s->timer_pc, task_pid_nr(current));
	if (!err && (!s->fired || s->timer_cpu != s->lazy_cpu)) {
		pr_err("scenario=irq-lazy: the timer did not fire on the lazy CPU within %u ms\n", timeout_ms);
		return -ETIMEDOUT;
	}
	return err;
}

static const struct {
	const char *name;
	int (*run)(void *area, size_t size);
} scenarios[] = {
	{ "apply-kernel", run_apply_kernel },
	{ "lazy-preempt", run_lazy_preempt },
	{ "lazy-migrate", run_lazy_migrate },
	{ "unpaired", run_unpaired },
	{ "irq-lazy", run_irq_lazy },
};

/* Whether init_mm_addr really is init_mm: kallsyms must name it "init_mm+0x0/...". */
static int check_init_mm(void)
{
	char name[KSYM_SYMBOL_LEN];

	if (!init_mm_addr) {
		pr_err("init_mm_addr is required (init_mm is not exported): "
		       "insmod lazyviolate.ko init_mm_addr=0x$(awk '$3==\"init_mm\"{print $1}' /proc/kallsyms) ...\n");
		return -EINVAL;
	}
	sprint_symbol(name, init_mm_addr);
	if (strncmp(name, "init_mm+0x0/", strlen("init_mm+0x0/"))) {
		pr_err("bad init_mm_addr: got %#lx, which kallsyms names %s\n", init_mm_addr, name);
		return -EINVAL;
	}
	kmm = (struct mm_struct *)init_mm_addr;
	return 0;
}

static int __init lazyviolate_init(void)
{
	size_t size;
	void *area;
	int i, err;

	if (pages < 1 || pages > 512) {
		pr_err("bad pages: got %u, want 1-512\n", pages);
		return -EINVAL;
	}
	for (i = 0; i < ARRAY_SIZE(scenarios); i++)
		if (!strcmp(scenario, scenarios[i].name))
			break;
	if (i == ARRAY_SIZE(scenarios)) {
		pr_err("bad scenario: got '%s', want apply-kernel, lazy-preempt, lazy-migrate, unpaired or irq-lazy\n",
		       scenario);
		return -EINVAL;
	}
	err = check_init_mm();
	if (err)
		return err;
	size = (size_t)pages * PAGE_SIZE;
	area = vmalloc(size);
	if (!area)
		return -ENOMEM;
	pr_info("scenario=%s start: area=%px pages=%u cpu=%d pid=%d comm=%s\n", scenario, area, pages,
		raw_smp_processor_id(), task_pid_nr(current), current->comm);
	err = scenarios[i].run(area, size);
	vfree(area);
	return err;
}

static void __exit lazyviolate_exit(void)
{
}

module_init(lazyviolate_init);
module_exit(lazyviolate_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("lazytrace");
MODULE_DESCRIPTION("Break the paravirt lazy MMU rules on purpose through exported kernel paths");
