/*
 * lazytrace.c - QEMU TCG plugin that records lazytrace's probe events at guest speed.
 *
 * The gdb stub stops the whole machine (and flushes QEMU's translation cache) at every event; this
 * plugin instead registers an instruction callback at every probe pc and reads registers and guest
 * memory from inside it, so the guest keeps running.  It needs plugin API version 4
 * (qemu_plugin_read_register since v2, qemu_plugin_read_memory_vaddr since v4: QEMU >= 9.2).
 *
 * Usage:  -plugin lazytrace.so,cfg=/path/to/plugin.cfg
 *
 * Everything the plugin knows about the kernel comes from that config file, which
 * tracer/plugin_recorder.py writes from the probe table resolved by tracer/symbols.py (one line per
 * directive, '#' comments):
 *
 *   lazytrace-plugin-config 1
 *   out <path>                     events.raw to write (format: tracer/rawformat.py)
 *   stats <path>                   JSON statistics written at exit
 *   arm marker|boot                record between the workload markers, or from the first event
 *   flush_ms <n>                   the flusher thread's period (a killed QEMU loses at most this much)
 *   irq eflags|xen                 interrupt state from eflags.IF, or from Xen PV's evtchn_upcall_mask
 *   offset <name> <value>          per-CPU / struct offsets and addresses (see NEED_OFFSETS below)
 *   loc <index> <pc> <event> [key=value ...]     one recorded probe location (locations.json "loc")
 *        key: ptep=<op> pteval=<op>    the set_pte arguments: a register name, or a constant
 *                                      (0, $0x0, #0: an inlined store of an immediate)
 *             next_task=<op>           switch: the next task_struct pointer (next_pid = s32 at +task_pid)
 *             mm=<op>                  an mm_struct pointer: mm_is_init = (mm == init_mm)
 *             mm_slot=<slot>           mm_is_init from the current task's per-task slot (set by a hook)
 *             marker=<op> len=<n> role=start|end|none
 *                                      a workload marker: <op> is __x64_sys_sethostname's pt_regs
 *                                      pointer; the location fires only if the hostname length (u64 at
 *                                      +pt_regs_si) is <n>; role start arms recording, end disarms it
 *   hook <pc> <slot> value=<op>        record nothing; set the current task's <slot> to <op>'s value
 *                                      (symbols.py hooks: __apply_to_page_range's mm, for mm_slot)
 *
 * Records: one 80-byte struct lt_record per event, in one global order.  A mutex guards the output
 * buffer; seq and t_ns are taken under it, so the file order is the recording order.  A flusher
 * thread writes the buffer every flush_ms, so a QEMU killed with SIGKILL leaves a readable file that
 * ends at most flush_ms before the kill (and at most one torn record, which readers drop).
 *
 * The current task's pid and comm are read on every event (one memory read covering both fields): a
 * cache keyed by the task pointer would be wrong after exec (the comm changes, the pointer does not)
 * and after a task_struct is freed and its slot reused by a new task, and validating a cache entry
 * costs the same read.
 *
 * Per-task slots are keyed by the current task_struct pointer, not the vCPU: with preempt=full the task
 * can be preempted, and migrate, between the hook and the location that reads the slot.
 *
 * Gotchas (measured, see shared/DESIGN.md): qemu_plugin_read_register APPENDS to its GByteArray, so
 * every read resets the array first; qemu_plugin_get_registers only works in the vcpu_init callback;
 * exec callbacks run before the instruction, like a gdb breakpoint.
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <glib.h>
#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

/* The oldest API that can read registers and guest memory from a callback. */
#define LT_MIN_API 4
#define LT_CONFIG_VERSION 1
#define LT_MAGIC "LZTRAW01"

/* Mirrors tracer/rawformat.py RECORD ("<QqQQQIiihhBBH16s4x"). Change both or neither. */
struct lt_record {
    uint64_t seq;
    int64_t t_ns;
    uint64_t pc;
    uint64_t ptep;
    uint64_t pteval;
    uint32_t preempt_raw;
    int32_t pid;
    int32_t next_pid;
    int16_t cpu;
    int16_t vcpu;
    uint8_t event;
    uint8_t flags;
    uint16_t loc;
    char comm[16];
    uint8_t lazy_mode;  /* valid with F_LAZY_KNOWN */
    uint8_t mc_pending; /* valid with F_MC_KNOWN */
    uint8_t pad[2];
};
_Static_assert(sizeof(struct lt_record) == 80, "raw record must be 80 bytes");
_Static_assert(offsetof(struct lt_record, preempt_raw) == 40, "raw layout");
_Static_assert(offsetof(struct lt_record, cpu) == 52, "raw layout");
_Static_assert(offsetof(struct lt_record, loc) == 58, "raw layout");
_Static_assert(offsetof(struct lt_record, comm) == 60, "raw layout");

/* tracer/rawformat.py F_* bits. */
#define F_IRQS_ON 0x01
#define F_PTEP 0x02
#define F_PTEVAL 0x04
#define F_MM_KNOWN 0x08
#define F_MM_INIT 0x10
#define F_LAZY_KNOWN 0x20
#define F_LAZY_MMU 0x40
#define F_MC_KNOWN 0x80

/* tracer/schema.py EVENTS index of "marker". */
#define EV_MARKER 8
#define EV_MAX 8

#define MAX_REGS 24
#define REG_NONE (-1)
#define REG_GS_BASE 0
#define REG_EFLAGS 1

/* A span of per-CPU or task_struct fields read with one memory read if it is this small. */
#define MAX_BLOCK 1024

#define MAX_SLOTS 8

enum marker_role { MR_NONE = 0, MR_START = 1, MR_END = 2 };
enum mm_mode { MM_NONE = 0, MM_REG = 1, MM_SLOT = 2 };

/* Where a value comes from: a register, or a constant (an inlined store of an immediate). */
struct operand {
    int8_t reg; /* REG_NONE: absent, unless imm */
    bool imm;
    uint64_t value;
};

struct loc {
    uint64_t pc;
    uint16_t index;
    uint8_t event;
    bool is_hook;       /* records nothing: sets hook_slot of the current task to value */
    int8_t hook_slot;
    struct operand ptep, pteval, next_task, mm, marker, value;
    uint8_t mm_mode;
    int8_t mm_slot;
    bool is_marker;
    uint8_t marker_role;
    int64_t marker_len;
};

/* All locations at one pc (several probes can share a pc: the two workload markers do). */
struct pcent {
    uint64_t pc;
    unsigned nlocs;
    struct loc **locs;
    bool needs_state; /* a hook or a marker: runs even when disarmed */
};

struct vcpu_state {
    struct qemu_plugin_register *reg[MAX_REGS];
    GByteArray *buf;
    uint64_t cpu_gs;   /* gs_base for which cpu is valid */
    int16_t cpu;
    bool ready;
    bool has_clock;
    clockid_t clock;   /* this vCPU thread's CPU-time clock */
    int64_t cpu_armed_ns; /* its CPU time when the current window opened */
    uint64_t hits;
    uint64_t read_failures;
};

static struct {
    /* configuration */
    char *out_path;
    char *stats_path;
    bool arm_boot;
    unsigned flush_ms;
    bool irq_xen;
    int64_t off_preempt, off_cpu, off_current, off_lazy, off_xen_vcpu, off_mc;
    int64_t off_task_pid, off_task_comm, off_pt_regs_si;
    uint64_t init_mm;
    char *reg_names[MAX_REGS];
    char *slot_names[MAX_SLOTS];
    int nslots;
    int nregs;
    struct loc *locs;
    unsigned nlocs;
    struct pcent *pcs; /* sorted by pc */
    unsigned npcs;
    /* per-CPU block [blk_lo, blk_hi) read at once when small */
    int64_t blk_lo, blk_hi;
    bool blk_one;
    int64_t task_lo, task_hi;
    bool task_one;

    /* runtime */
    int api_min, api_cur;
    int max_vcpus;
    struct vcpu_state *vcpus;
    atomic_bool armed;
    atomic_int arm_windows;
    atomic_bool broken;
    char broken_reason[256];

    /* per-task slots: task_struct pointer -> value, one table per slot */
    pthread_mutex_t slot_lock;
    GHashTable *slots[MAX_SLOTS];
    uint64_t hook_hits;

    pthread_mutex_t lock;
    int fd;
    struct lt_record *buf;
    size_t nbuf, cap;
    uint64_t seq;
    uint64_t written, write_errors, lost;
    int64_t t_first, t_last, t_armed, t_disarmed;
    int64_t window_cpu_ns; /* CPU time all vCPU threads spent inside arm windows */
    uint64_t *loc_counts;

    pthread_t flusher;
    bool flusher_running;
    atomic_bool stop;
    uint64_t tb_instrumented;
} g = {
    .fd = -1,
    .flush_ms = 200,
    .off_preempt = -1, .off_cpu = -1, .off_current = -1, .off_lazy = -1, .off_xen_vcpu = -1, .off_mc = -1,
    .off_task_pid = -1, .off_task_comm = -1, .off_pt_regs_si = -1,
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .slot_lock = PTHREAD_MUTEX_INITIALIZER,
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void lt_log(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
static void lt_log(const char *fmt, ...)
{
    va_list ap;
    char msg[512];
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "lazytrace-plugin: %s\n", msg);
    g_autofree char *line = g_strdup_printf("lazytrace-plugin: %s\n", msg);
    qemu_plugin_outs(line);
}

/* Stop recording for good, and say why (kept for the stats file). */
static void set_broken(const char *why)
{
    bool was = atomic_exchange(&g.broken, true);
    if (!was) {
        g_strlcpy(g.broken_reason, why, sizeof g.broken_reason);
        lt_log("recording disabled: %s", why);
    }
}

/* ---------------------------------------------------------------- configuration */

static int reg_id(const char *name)
{
    for (int i = 0; i < g.nregs; i++) {
        if (strcmp(g.reg_names[i], name) == 0) {
            return i;
        }
    }
    if (g.nregs == MAX_REGS) {
        return REG_NONE;
    }
    g.reg_names[g.nregs] = g_strdup(name);
    return g.nregs++;
}

static int slot_id(const char *name)
{
    for (int i = 0; i < g.nslots; i++) {
        if (strcmp(g.slot_names[i], name) == 0) {
            return i;
        }
    }
    if (g.nslots == MAX_SLOTS) {
        return -1;
    }
    g.slot_names[g.nslots] = g_strdup(name);
    return g.nslots++;
}

static bool parse_i64(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (errno || end == s || *end) {
        /* pcs and addresses are above INT64_MAX: accept them as unsigned */
        errno = 0;
        unsigned long long u = strtoull(s, &end, 0);
        if (errno || end == s || *end) {
            return false;
        }
        v = (long long)u;
    }
    *out = v;
    return true;
}

/* An operand: a register name, or an integer constant (0, 0x10, $0x0, #0). */
static bool parse_operand(const char *key, const char *v, struct operand *op, GString *err)
{
    int64_t imm;
    const char *num = (*v == '$' || *v == '#') ? v + 1 : v;
    if ((g_ascii_isdigit(*num) || *num == '-') && parse_i64(num, &imm)) {
        op->imm = true;
        op->value = (uint64_t)imm;
        return true;
    }
    if (!g_ascii_isalpha(*v)) {
        g_string_append_printf(err, "bad operand '%s' for %s", v, key);
        return false;
    }
    int r = reg_id(v);
    if (r == REG_NONE) {
        g_string_append(err, "too many distinct registers");
        return false;
    }
    op->reg = (int8_t)r;
    return true;
}

static void init_loc(struct loc *l)
{
    *l = (struct loc){
        .ptep.reg = REG_NONE, .pteval.reg = REG_NONE, .next_task.reg = REG_NONE,
        .mm.reg = REG_NONE, .marker.reg = REG_NONE, .value.reg = REG_NONE,
        .hook_slot = -1, .mm_slot = -1,
    };
}

/* loc <index> <pc> <event> [key=value ...] */
static bool parse_loc(char **tok, int ntok, struct loc *l, GString *err)
{
    int64_t idx, pc, ev;
    if (ntok < 4 || !parse_i64(tok[1], &idx) || !parse_i64(tok[2], &pc) || !parse_i64(tok[3], &ev)) {
        g_string_append(err, "want: loc <index> <pc> <event> [key=value ...]");
        return false;
    }
    if (idx < 0 || idx > 0xffff || ev < 0 || ev > EV_MAX) {
        g_string_append_printf(err, "index %" PRId64 " or event %" PRId64 " out of range", idx, ev);
        return false;
    }
    init_loc(l);
    l->pc = (uint64_t)pc;
    l->index = (uint16_t)idx;
    l->event = (uint8_t)ev;
    for (int i = 4; i < ntok; i++) {
        char *eq = strchr(tok[i], '=');
        if (!eq) {
            g_string_append_printf(err, "bad read '%s' (want key=value)", tok[i]);
            return false;
        }
        *eq = 0;
        const char *k = tok[i], *v = eq + 1;
        struct operand *op = NULL;
        if (!strcmp(k, "ptep")) {
            op = &l->ptep;
        } else if (!strcmp(k, "pteval")) {
            op = &l->pteval;
        } else if (!strcmp(k, "next_task")) {
            op = &l->next_task;
        } else if (!strcmp(k, "mm")) {
            l->mm_mode = MM_REG;
            op = &l->mm;
        } else if (!strcmp(k, "marker")) {
            l->is_marker = true;
            op = &l->marker;
        } else if (!strcmp(k, "mm_slot")) {
            l->mm_mode = MM_SLOT;
            l->mm_slot = (int8_t)slot_id(v);
            if (l->mm_slot < 0) {
                g_string_append(err, "too many distinct slots");
                return false;
            }
            continue;
        } else if (!strcmp(k, "len")) {
            if (!parse_i64(v, &l->marker_len)) {
                g_string_append_printf(err, "bad len '%s'", v);
                return false;
            }
            continue;
        } else if (!strcmp(k, "role")) {
            if (!strcmp(v, "start")) {
                l->marker_role = MR_START;
            } else if (!strcmp(v, "end")) {
                l->marker_role = MR_END;
            } else if (!strcmp(v, "none")) {
                l->marker_role = MR_NONE;
            } else {
                g_string_append_printf(err, "bad role '%s' (want start, end or none)", v);
                return false;
            }
            continue;
        } else {
            g_string_append_printf(err, "unknown read '%s'", k);
            return false;
        }
        if (!parse_operand(k, v, op, err)) {
            return false;
        }
    }
    if (l->is_marker && l->marker_len <= 0) {
        g_string_append(err, "a marker location needs len=<hostname length>");
        return false;
    }
    if (l->marker_role && !l->is_marker) {
        g_string_append(err, "role= needs marker=<op>");
        return false;
    }
    return true;
}

/* hook <pc> <slot> value=<op> */
static bool parse_hook(char **tok, int ntok, struct loc *l, GString *err)
{
    int64_t pc;
    if (ntok != 4 || !parse_i64(tok[1], &pc) || !g_str_has_prefix(tok[3], "value=")) {
        g_string_append(err, "want: hook <pc> <slot> value=<op>");
        return false;
    }
    init_loc(l);
    l->pc = (uint64_t)pc;
    l->is_hook = true;
    l->index = 0xffff;
    l->hook_slot = (int8_t)slot_id(tok[2]);
    if (l->hook_slot < 0) {
        g_string_append(err, "too many distinct slots");
        return false;
    }
    return parse_operand("value", tok[3] + 6, &l->value, err);
}

static struct {
    const char *name;
    int64_t *slot;
    bool required;
} OFFSETS[] = {
    {"pcpu_preempt_count", &g.off_preempt, true},
    {"pcpu_cpu_number", &g.off_cpu, true},
    {"pcpu_current_task", &g.off_current, true},
    {"task_pid", &g.off_task_pid, true},
    {"task_comm", &g.off_task_comm, true},
    {"init_mm", (int64_t *)&g.init_mm, false},
    {"pt_regs_si", &g.off_pt_regs_si, false},
    {"pcpu_lazy_mode", &g.off_lazy, false},
    {"pcpu_xen_vcpu", &g.off_xen_vcpu, false},
    {"pcpu_mc_buffer", &g.off_mc, false},
};

static int cmp_loc_pc(const void *a, const void *b)
{
    const struct loc *x = a, *y = b;
    return x->pc < y->pc ? -1 : x->pc > y->pc ? 1 : (int)x->index - (int)y->index;
}

static bool load_config(const char *path, GString *err)
{
    g_autofree char *text = NULL;
    g_autoptr(GError) gerr = NULL;
    if (!g_file_get_contents(path, &text, NULL, &gerr)) {
        g_string_append_printf(err, "cannot read config %s: %s", path, gerr->message);
        return false;
    }
    g_auto(GStrv) lines = g_strsplit(text, "\n", -1);
    GArray *locs = g_array_new(FALSE, TRUE, sizeof(struct loc));
    bool seen_header = false;
    reg_id("gs_base");
    reg_id("eflags");
    for (int ln = 0; lines[ln]; ln++) {
        char *line = g_strstrip(lines[ln]);
        if (!*line || *line == '#') {
            continue;
        }
        g_auto(GStrv) tok = g_strsplit_set(line, " \t", -1);
        /* collapse empty tokens from repeated blanks */
        int n = 0;
        for (int i = 0; tok[i]; i++) {
            if (*tok[i]) {
                char *t = tok[i];
                tok[i] = tok[n];
                tok[n++] = t;
            }
        }
        const char *k = tok[0];
        bool ok = true;
        int64_t v;
        if (!strcmp(k, "lazytrace-plugin-config")) {
            ok = n == 2 && parse_i64(tok[1], &v) && v == LT_CONFIG_VERSION;
            seen_header = ok;
        } else if (!seen_header) {
            g_string_append(err, "first directive must be 'lazytrace-plugin-config 1'");
            ok = false;
        } else if (!strcmp(k, "out") && n == 2) {
            g.out_path = g_strdup(tok[1]);
        } else if (!strcmp(k, "stats") && n == 2) {
            g.stats_path = g_strdup(tok[1]);
        } else if (!strcmp(k, "arm") && n == 2) {
            ok = !strcmp(tok[1], "boot") || !strcmp(tok[1], "marker");
            g.arm_boot = !strcmp(tok[1], "boot");
        } else if (!strcmp(k, "flush_ms") && n == 2) {
            ok = parse_i64(tok[1], &v) && v >= 1 && v <= 60000;
            g.flush_ms = (unsigned)v;
        } else if (!strcmp(k, "irq") && n == 2) {
            ok = !strcmp(tok[1], "eflags") || !strcmp(tok[1], "xen");
            g.irq_xen = !strcmp(tok[1], "xen");
        } else if (!strcmp(k, "offset") && n == 3) {
            ok = parse_i64(tok[2], &v);
            bool known = false;
            for (size_t i = 0; ok && i < G_N_ELEMENTS(OFFSETS); i++) {
                if (!strcmp(OFFSETS[i].name, tok[1])) {
                    *OFFSETS[i].slot = v;
                    known = true;
                }
            }
            (void)known; /* unknown offsets are ignored: the config may carry more than we use */
        } else if (!strcmp(k, "loc")) {
            struct loc l;
            ok = parse_loc(tok, n, &l, err);
            if (ok) {
                g_array_append_val(locs, l);
            }
        } else if (!strcmp(k, "hook")) {
            struct loc l;
            ok = parse_hook(tok, n, &l, err);
            if (ok) {
                g_array_append_val(locs, l);
            }
        } else {
            ok = false;
        }
        if (!ok) {
            g_string_prepend(err, " ");
            g_string_prepend(err, line);
            g_string_prepend(err, g_strdup_printf("%s:%d: bad directive: ", path, ln + 1));
            g_array_free(locs, TRUE);
            return false;
        }
    }
    if (!seen_header) {
        g_string_append_printf(err, "%s: not a lazytrace plugin config", path);
        g_array_free(locs, TRUE);
        return false;
    }
    for (size_t i = 0; i < G_N_ELEMENTS(OFFSETS); i++) {
        if (OFFSETS[i].required && *OFFSETS[i].slot < 0) {
            g_string_append_printf(err, "%s: missing 'offset %s'", path, OFFSETS[i].name);
            g_array_free(locs, TRUE);
            return false;
        }
    }
    if (!g.out_path) {
        g_string_append_printf(err, "%s: missing 'out <path>'", path);
        g_array_free(locs, TRUE);
        return false;
    }
    if (g.irq_xen && g.off_xen_vcpu < 0) {
        g_string_append_printf(err, "%s: 'irq xen' needs 'offset pcpu_xen_vcpu'", path);
        g_array_free(locs, TRUE);
        return false;
    }
    g.nlocs = locs->len;
    g.locs = (struct loc *)g_array_free(locs, FALSE);
    for (unsigned i = 0; i < g.nlocs; i++) {
        struct loc *l = &g.locs[i];
        if (l->is_marker && g.off_pt_regs_si < 0) {
            g_string_append_printf(err, "%s: marker locations need 'offset pt_regs_si'", path);
            return false;
        }
        if (l->mm_mode && g.init_mm == (uint64_t)-1) {
            g_string_append_printf(err, "%s: mm reads need 'offset init_mm'", path);
            return false;
        }
    }
    qsort(g.locs, g.nlocs, sizeof *g.locs, cmp_loc_pc);
    unsigned max_index = 0;
    for (unsigned i = 0; i < g.nlocs; i++) {
        if (!g.locs[i].is_hook) {
            max_index = MAX(max_index, g.locs[i].index);
        }
    }
    for (int i = 0; i < g.nslots; i++) {
        g.slots[i] = g_hash_table_new(g_direct_hash, g_direct_equal);
    }
    g.loc_counts = g_new0(uint64_t, max_index + 1);

    /* group by pc */
    g.pcs = g_new0(struct pcent, g.nlocs ? g.nlocs : 1);
    for (unsigned i = 0; i < g.nlocs;) {
        unsigned j = i;
        while (j < g.nlocs && g.locs[j].pc == g.locs[i].pc) {
            j++;
        }
        struct pcent *pe = &g.pcs[g.npcs++];
        pe->pc = g.locs[i].pc;
        pe->nlocs = j - i;
        pe->locs = g_new(struct loc *, pe->nlocs);
        for (unsigned k2 = i; k2 < j; k2++) {
            pe->locs[k2 - i] = &g.locs[k2];
            pe->needs_state |= g.locs[k2].is_hook || g.locs[k2].is_marker;
        }
        i = j;
    }

    /* per-CPU fields read as one block when they sit close together (pcpu_hot in 6.9+) */
    g.blk_lo = MIN(g.off_preempt, g.off_current);
    g.blk_hi = MAX(g.off_preempt + 4, g.off_current + 8);
    if (g.off_lazy >= 0) {
        int64_t lo = MIN(g.blk_lo, g.off_lazy), hi = MAX(g.blk_hi, g.off_lazy + 4);
        if (hi - lo <= MAX_BLOCK) {
            g.blk_lo = lo;
            g.blk_hi = hi;
        }
    }
    g.blk_one = g.blk_hi - g.blk_lo <= MAX_BLOCK;
    g.task_lo = MIN(g.off_task_pid, g.off_task_comm);
    g.task_hi = MAX(g.off_task_pid + 4, g.off_task_comm + 16);
    g.task_one = g.task_hi - g.task_lo <= MAX_BLOCK;
    return true;
}

/* ---------------------------------------------------------------- output */

static bool write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return false;
        }
        c += w;
        n -= (size_t)w;
    }
    return true;
}

/* Caller holds g.lock. */
static void flush_locked(void)
{
    if (!g.nbuf) {
        return;
    }
    if (g.fd >= 0 && write_all(g.fd, g.buf, g.nbuf * sizeof *g.buf)) {
        g.written += g.nbuf;
    } else {
        g.write_errors++;
        g.lost += g.nbuf;
    }
    g.nbuf = 0;
}

static void *flusher_main(void *arg)
{
    (void)arg;
    while (!atomic_load(&g.stop)) {
        struct timespec ts = {.tv_sec = g.flush_ms / 1000, .tv_nsec = (long)(g.flush_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&g.lock);
        flush_locked();
        pthread_mutex_unlock(&g.lock);
    }
    return NULL;
}

static void set_armed_locked(bool on);

/*
 * Append one record. arm > 0: this is the start marker, open the window after it; arm < 0: the end marker,
 * close the window after it. Both happen under the lock that orders records, so the start marker is the
 * window's first record and the end marker its last: another vCPU that saw the window open (or not yet
 * closed) before taking the lock is checked again here.
 */
static void emit(struct lt_record *r, unsigned loc_index, int arm)
{
    pthread_mutex_lock(&g.lock);
    if (arm == 0 && !atomic_load_explicit(&g.armed, memory_order_relaxed)) {
        pthread_mutex_unlock(&g.lock); /* raced with the end marker: outside the window */
        return;
    }
    r->seq = g.seq++;
    r->t_ns = now_ns();
    if (!g.t_first) {
        g.t_first = r->t_ns;
    }
    g.t_last = r->t_ns;
    g.loc_counts[loc_index]++;
    g.buf[g.nbuf++] = *r;
    if (g.nbuf == g.cap) {
        flush_locked();
    }
    if (arm) {
        set_armed_locked(arm > 0);
    }
    pthread_mutex_unlock(&g.lock);
}

static int64_t thread_cpu_ns(const struct vcpu_state *vs)
{
    struct timespec ts;
    if (!vs->has_clock || clock_gettime(vs->clock, &ts) != 0) {
        return -1;
    }
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/*
 * Open or close an arm window. Besides wall time, the CPU time the vCPU threads spend inside the window is
 * summed: unlike the wall-clock window it does not stretch when other processes compete for the host's
 * cores, so the benchmark can compare traced and untraced runs on a busy host.
 */
static void set_armed_locked(bool on)
{
    bool was = atomic_exchange(&g.armed, on);
    if (was == on) {
        return;
    }
    for (int i = 0; i < g.max_vcpus; i++) {
        struct vcpu_state *vs = &g.vcpus[i];
        int64_t c = thread_cpu_ns(vs);
        if (c < 0) {
            continue;
        }
        if (on) {
            vs->cpu_armed_ns = c;
        } else if (vs->cpu_armed_ns) {
            g.window_cpu_ns += c - vs->cpu_armed_ns;
            vs->cpu_armed_ns = 0;
        }
    }
    if (on) {
        atomic_fetch_add(&g.arm_windows, 1);
        if (!g.t_armed) {
            g.t_armed = now_ns();
        }
    } else {
        g.t_disarmed = now_ns();
    }
}

/* ---------------------------------------------------------------- reading the guest */

static inline bool read_reg(struct vcpu_state *vs, int r, uint64_t *out)
{
    if (r < 0 || !vs->reg[r]) {
        return false;
    }
    g_byte_array_set_size(vs->buf, 0); /* read_register appends */
    int n = qemu_plugin_read_register(vs->reg[r], vs->buf);
    if (n <= 0 || n > 8) {
        return false;
    }
    uint64_t v = 0;
    memcpy(&v, vs->buf->data, (size_t)n); /* x86 target order is little-endian, as is the host */
    *out = v;
    return true;
}

static inline bool read_mem(struct vcpu_state *vs, uint64_t addr, void *out, size_t len)
{
    g_byte_array_set_size(vs->buf, 0);
    if (!qemu_plugin_read_memory_vaddr(addr, vs->buf, len) || vs->buf->len < len) {
        vs->read_failures++;
        return false;
    }
    memcpy(out, vs->buf->data, len);
    return true;
}

/* Register values read at most once per callback. */
struct regcache {
    uint32_t have;
    uint64_t v[MAX_REGS];
};

static inline bool reg(struct vcpu_state *vs, struct regcache *rc, int r, uint64_t *out)
{
    if (r < 0) {
        return false;
    }
    if (!(rc->have & (1u << r))) {
        if (!read_reg(vs, r, &rc->v[r])) {
            vs->read_failures++;
            return false;
        }
        rc->have |= 1u << r;
    }
    *out = rc->v[r];
    return true;
}

/* An operand's value: false if the location does not have it (or its register is unreadable). */
static inline bool operand(struct vcpu_state *vs, struct regcache *rc, const struct operand *op, uint64_t *out)
{
    if (op->imm) {
        *out = op->value;
        return true;
    }
    return reg(vs, rc, op->reg, out);
}

/* The current task_struct pointer (0 if unreadable). */
static uint64_t current_task(struct vcpu_state *vs, struct regcache *rc)
{
    uint64_t gs, task = 0;
    if (reg(vs, rc, REG_GS_BASE, &gs)) {
        read_mem(vs, gs + (uint64_t)g.off_current, &task, 8);
    }
    return task;
}

/* enum paravirt_lazy_mode: 0 none, 1 MMU, 2 CPU */
static void set_lazy_mode(struct lt_record *r, uint32_t mode)
{
    r->flags |= F_LAZY_KNOWN | (mode == 1 ? F_LAZY_MMU : 0);
    r->lazy_mode = mode > 255 ? 255 : (uint8_t)mode;
}

/*
 * The common fields every record carries: cpu, preempt_count, irqs, pid, comm, lazy state.
 * Returns the current task_struct pointer (0 if unreadable).
 */
static uint64_t fill_common(struct vcpu_state *vs, struct regcache *rc, struct lt_record *r)
{
    uint64_t gs = 0, eflags = 0;
    r->cpu = -1;
    r->pid = -1;
    r->next_pid = -1;
    if (!reg(vs, rc, REG_GS_BASE, &gs)) {
        return 0;
    }
    if (g.irq_xen) {
        uint64_t vcpu_info = 0;
        uint8_t mask = 1;
        if (read_mem(vs, gs + (uint64_t)g.off_xen_vcpu, &vcpu_info, 8) && vcpu_info &&
            read_mem(vs, vcpu_info + 1, &mask, 1) && mask == 0) {
            r->flags |= F_IRQS_ON;
        }
    } else if (reg(vs, rc, REG_EFLAGS, &eflags) && (eflags & (1u << 9))) {
        r->flags |= F_IRQS_ON;
    }

    /* cpu_number never changes for a given per-CPU area: read it once per gs_base */
    if (vs->cpu_gs != gs || vs->cpu < 0) {
        uint32_t cpu;
        if (read_mem(vs, gs + (uint64_t)g.off_cpu, &cpu, 4)) {
            vs->cpu = (int16_t)cpu;
            vs->cpu_gs = gs;
        } else {
            vs->cpu = -1;
        }
    }
    r->cpu = vs->cpu;

    uint64_t task = 0;
    uint8_t blk[MAX_BLOCK];
    if (g.blk_one && read_mem(vs, gs + (uint64_t)g.blk_lo, blk, (size_t)(g.blk_hi - g.blk_lo))) {
        memcpy(&r->preempt_raw, blk + (g.off_preempt - g.blk_lo), 4);
        memcpy(&task, blk + (g.off_current - g.blk_lo), 8);
        if (g.off_lazy >= 0 && g.off_lazy >= g.blk_lo && g.off_lazy + 4 <= g.blk_hi) {
            uint32_t mode;
            memcpy(&mode, blk + (g.off_lazy - g.blk_lo), 4);
            set_lazy_mode(r, mode);
        }
    } else {
        read_mem(vs, gs + (uint64_t)g.off_preempt, &r->preempt_raw, 4);
        read_mem(vs, gs + (uint64_t)g.off_current, &task, 8);
    }
    if (g.off_lazy >= 0 && !(r->flags & F_LAZY_KNOWN)) {
        uint32_t mode;
        if (read_mem(vs, gs + (uint64_t)g.off_lazy, &mode, 4)) {
            set_lazy_mode(r, mode);
        }
    }
    if (g.off_mc >= 0) {
        /* struct mc_buffer starts with 'unsigned mcidx': entries queued, not yet issued to Xen */
        uint32_t mcidx;
        if (read_mem(vs, gs + (uint64_t)g.off_mc, &mcidx, 4)) {
            r->flags |= F_MC_KNOWN;
            r->mc_pending = mcidx > 255 ? 255 : (uint8_t)mcidx;
        }
    }
    if (!task) {
        return 0;
    }
    if (g.task_one) {
        uint8_t tb[MAX_BLOCK];
        if (read_mem(vs, task + (uint64_t)g.task_lo, tb, (size_t)(g.task_hi - g.task_lo))) {
            memcpy(&r->pid, tb + (g.off_task_pid - g.task_lo), 4);
            memcpy(r->comm, tb + (g.off_task_comm - g.task_lo), 16);
        }
    } else {
        read_mem(vs, task + (uint64_t)g.off_task_pid, &r->pid, 4);
        read_mem(vs, task + (uint64_t)g.off_task_comm, r->comm, 16);
    }
    r->comm[15] = 0;
    return task;
}

/* Is this __x64_sys_sethostname call the marker location l stands for? Its length argument tells. */
static bool marker_matches(struct vcpu_state *vs, struct regcache *rc, const struct loc *l)
{
    uint64_t regs, len;
    return operand(vs, rc, &l->marker, &regs) &&
           read_mem(vs, regs + (uint64_t)g.off_pt_regs_si, &len, 8) && (int64_t)len == l->marker_len;
}

static void run_hook(struct vcpu_state *vs, struct regcache *rc, const struct loc *l)
{
    uint64_t task = current_task(vs, rc), value;
    if (!task || !operand(vs, rc, &l->value, &value)) {
        return;
    }
    pthread_mutex_lock(&g.slot_lock);
    g_hash_table_insert(g.slots[l->hook_slot], GSIZE_TO_POINTER(task), GSIZE_TO_POINTER(value));
    g.hook_hits++;
    pthread_mutex_unlock(&g.slot_lock);
}

static bool slot_value(int slot, uint64_t task, uint64_t *out)
{
    gpointer v;
    pthread_mutex_lock(&g.slot_lock);
    bool found = g_hash_table_lookup_extended(g.slots[slot], GSIZE_TO_POINTER(task), NULL, &v);
    pthread_mutex_unlock(&g.slot_lock);
    *out = GPOINTER_TO_SIZE(v);
    return found;
}

static void on_probe(unsigned int vcpu_index, void *udata)
{
    const struct pcent *pe = udata;
    bool armed = atomic_load_explicit(&g.armed, memory_order_relaxed);
    if ((!armed && !pe->needs_state) || atomic_load_explicit(&g.broken, memory_order_relaxed)) {
        return;
    }
    if ((int)vcpu_index >= g.max_vcpus) {
        return;
    }
    struct vcpu_state *vs = &g.vcpus[vcpu_index];
    if (!vs->ready) {
        return;
    }
    vs->hits++;
    struct regcache rc = {0};
    struct lt_record common;
    uint64_t task = 0;
    bool have_common = false;

    for (unsigned i = 0; i < pe->nlocs; i++) {
        const struct loc *l = pe->locs[i];
        uint64_t v;
        if (l->is_hook) {
            run_hook(vs, &rc, l);
            continue;
        }
        int arm = 0;
        if (l->is_marker) {
            if (!marker_matches(vs, &rc, l)) {
                continue;
            }
            if (l->marker_role == MR_START) {
                arm = 1;
            } else if (l->marker_role == MR_END && !g.arm_boot) {
                arm = -1;
            }
        }
        if (!armed && arm <= 0) {
            continue;
        }
        if (!have_common) {
            memset(&common, 0, sizeof common);
            task = fill_common(vs, &rc, &common);
            common.vcpu = (int16_t)vcpu_index;
            have_common = true;
        }
        struct lt_record r = common;
        r.pc = pe->pc;
        r.event = l->event;
        r.loc = l->index;
        if (operand(vs, &rc, &l->ptep, &v)) {
            r.ptep = v;
            r.flags |= F_PTEP;
        }
        if (operand(vs, &rc, &l->pteval, &v)) {
            r.pteval = v;
            r.flags |= F_PTEVAL;
        }
        if (l->mm_mode == MM_REG && operand(vs, &rc, &l->mm, &v)) {
            r.flags |= F_MM_KNOWN | (v == g.init_mm ? F_MM_INIT : 0);
        } else if (l->mm_mode == MM_SLOT && task && slot_value(l->mm_slot, task, &v)) {
            r.flags |= F_MM_KNOWN | (v == g.init_mm ? F_MM_INIT : 0);
        }
        if (l->next_task.reg != REG_NONE || l->next_task.imm) {
            int32_t np = -1;
            if (operand(vs, &rc, &l->next_task, &v) && v) {
                read_mem(vs, v + (uint64_t)g.off_task_pid, &np, 4);
            }
            r.next_pid = np;
        }
        emit(&r, l->index, arm);
        armed = atomic_load_explicit(&g.armed, memory_order_relaxed);
    }
}

/* ---------------------------------------------------------------- QEMU hooks */

static const struct pcent *find_pc_from(uint64_t lo)
{
    /* first pcent with pc >= lo */
    unsigned a = 0, b = g.npcs;
    while (a < b) {
        unsigned m = (a + b) / 2;
        if (g.pcs[m].pc < lo) {
            a = m + 1;
        } else {
            b = m;
        }
    }
    return a < g.npcs ? &g.pcs[a] : NULL;
}

static void vcpu_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (!n) {
        return;
    }
    uint64_t first = qemu_plugin_insn_vaddr(qemu_plugin_tb_get_insn(tb, 0));
    uint64_t last = qemu_plugin_insn_vaddr(qemu_plugin_tb_get_insn(tb, n - 1));
    const struct pcent *pe = find_pc_from(first);
    if (!pe || pe->pc > last) {
        return; /* the common case: no probe in this block */
    }
    const struct pcent *end = g.pcs + g.npcs;
    for (size_t i = 0; i < n && pe < end; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t va = qemu_plugin_insn_vaddr(insn);
        while (pe < end && pe->pc < va) {
            pe++;
        }
        if (pe < end && pe->pc == va) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_probe, QEMU_PLUGIN_CB_R_REGS, (void *)pe);
            __atomic_fetch_add(&g.tb_instrumented, 1, __ATOMIC_RELAXED);
        }
    }
}

static void vcpu_init(qemu_plugin_id_t id, unsigned int vcpu_index)
{
    (void)id;
    if ((int)vcpu_index >= g.max_vcpus) {
        set_broken("vCPU index beyond max_vcpus");
        return;
    }
    struct vcpu_state *vs = &g.vcpus[vcpu_index];
    vs->buf = g_byte_array_sized_new(MAX_BLOCK);
    vs->cpu = -1;
    vs->has_clock = pthread_getcpuclockid(pthread_self(), &vs->clock) == 0;
    g_autoptr(GArray) regs = qemu_plugin_get_registers();
    for (int r = 0; r < g.nregs; r++) {
        for (guint i = 0; regs && i < regs->len; i++) {
            qemu_plugin_reg_descriptor *d = &g_array_index(regs, qemu_plugin_reg_descriptor, i);
            if (!strcmp(d->name, g.reg_names[r])) {
                vs->reg[r] = d->handle;
                break;
            }
        }
        if (!vs->reg[r]) {
            g_autofree char *why = g_strdup_printf("vCPU %u has no register named '%s'", vcpu_index,
                                                   g.reg_names[r]);
            set_broken(why);
            return;
        }
    }
    vs->ready = true;
}

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; s && *s; s++) {
        if (*s == '"' || *s == '\\') {
            fprintf(f, "\\%c", *s);
        } else if ((unsigned char)*s < 0x20) {
            fprintf(f, "\\u%04x", *s);
        } else {
            fputc(*s, f);
        }
    }
    fputc('"', f);
}

static void write_stats(void)
{
    if (!g.stats_path) {
        return;
    }
    g_autofree char *tmp = g_strdup_printf("%s.tmp", g.stats_path);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        lt_log("cannot write %s: %s", tmp, strerror(errno));
        return;
    }
    uint64_t hits = 0, rf = 0;
    for (int i = 0; i < g.max_vcpus; i++) {
        hits += g.vcpus[i].hits;
        rf += g.vcpus[i].read_failures;
    }
    fprintf(f, "{\n  \"plugin_api_min\": %d,\n  \"plugin_api_cur\": %d,\n  \"plugin_api_built\": %d,\n",
            g.api_min, g.api_cur, QEMU_PLUGIN_VERSION);
    fprintf(f, "  \"events_recorded\": %" PRIu64 ",\n  \"events_written\": %" PRIu64 ",\n", g.seq, g.written);
    fprintf(f, "  \"events_lost\": %" PRIu64 ",\n  \"write_errors\": %" PRIu64 ",\n", g.lost, g.write_errors);
    fprintf(f, "  \"read_failures\": %" PRIu64 ",\n  \"probe_hits\": %" PRIu64 ",\n", rf, hits);
    fprintf(f, "  \"instrumented_insns\": %" PRIu64 ",\n  \"hook_hits\": %" PRIu64 ",\n", g.tb_instrumented,
            g.hook_hits);
    fprintf(f, "  \"arm\": \"%s\",\n  \"arm_windows\": %d,\n  \"armed_at_exit\": %s,\n",
            g.arm_boot ? "boot" : "marker", atomic_load(&g.arm_windows), atomic_load(&g.armed) ? "true" : "false");
    fprintf(f, "  \"t_first_ns\": %" PRId64 ",\n  \"t_last_ns\": %" PRId64 ",\n", g.t_first, g.t_last);
    fprintf(f, "  \"t_armed_ns\": %" PRId64 ",\n  \"t_disarmed_ns\": %" PRId64 ",\n", g.t_armed, g.t_disarmed);
    fprintf(f, "  \"window_vcpu_cpu_ns\": %" PRId64 ",\n", g.window_cpu_ns);
    fprintf(f, "  \"vcpus\": %d,\n  \"broken\": ", g.max_vcpus);
    if (atomic_load(&g.broken)) {
        json_str(f, g.broken_reason);
    } else {
        fputs("null", f);
    }
    fputs(",\n  \"loc_counts\": {", f);
    bool first = true;
    for (unsigned i = 0; i < g.nlocs; i++) {
        unsigned idx = g.locs[i].index;
        if (!g.locs[i].is_hook && g.loc_counts[idx]) {
            fprintf(f, "%s\"%u\": %" PRIu64, first ? "" : ", ", idx, g.loc_counts[idx]);
            first = false;
        }
    }
    fputs("}\n}\n", f);
    fclose(f);
    rename(tmp, g.stats_path);
}

static void plugin_exit(qemu_plugin_id_t id, void *p)
{
    (void)id;
    (void)p;
    atomic_store(&g.stop, true);
    if (g.flusher_running) {
        pthread_join(g.flusher, NULL);
        g.flusher_running = false;
    }
    pthread_mutex_lock(&g.lock);
    flush_locked();
    if (g.fd >= 0) {
        fsync(g.fd);
        close(g.fd);
        g.fd = -1;
    }
    pthread_mutex_unlock(&g.lock);
    write_stats();
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    const char *cfg = NULL;
    g.api_min = info->version.min;
    g.api_cur = info->version.cur;
    if (info->version.cur < LT_MIN_API) {
        lt_log("QEMU plugin API %d is too old: lazytrace needs %d (QEMU >= 9.2) to read registers and "
               "memory", info->version.cur, LT_MIN_API);
        return -1;
    }
    if (!info->system_emulation || strcmp(info->target_name, "x86_64") != 0) {
        lt_log("needs qemu-system-x86_64 (got %s, %s)", info->target_name,
               info->system_emulation ? "system" : "user");
        return -1;
    }
    for (int i = 0; i < argc; i++) {
        if (g_str_has_prefix(argv[i], "cfg=")) {
            cfg = argv[i] + 4;
        } else {
            lt_log("unknown argument '%s' (want cfg=<path>)", argv[i]);
            return -1;
        }
    }
    if (!cfg) {
        lt_log("missing argument cfg=<path>");
        return -1;
    }
    g_autoptr(GString) err = g_string_new(NULL);
    g.init_mm = (uint64_t)-1;
    if (!load_config(cfg, err)) {
        lt_log("%s", err->str);
        return -1;
    }
    g.fd = open(g.out_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (g.fd < 0) {
        lt_log("cannot create %s: %s", g.out_path, strerror(errno));
        return -1;
    }
    if (!write_all(g.fd, LT_MAGIC, 8)) {
        lt_log("cannot write %s: %s", g.out_path, strerror(errno));
        return -1;
    }
    g.max_vcpus = MAX(info->system.max_vcpus, info->system.smp_vcpus);
    g.vcpus = g_new0(struct vcpu_state, g.max_vcpus);
    g.cap = 4096;
    g.buf = g_new(struct lt_record, g.cap);
    atomic_store(&g.armed, g.arm_boot);
    if (g.arm_boot) {
        g.t_armed = now_ns();
        g.arm_windows = 1;
    }
    if (pthread_create(&g.flusher, NULL, flusher_main, NULL) == 0) {
        g.flusher_running = true;
    } else {
        lt_log("no flusher thread: records are written only when the buffer fills");
    }
    qemu_plugin_register_vcpu_init_cb(id, vcpu_init);
    qemu_plugin_register_vcpu_tb_trans_cb(id, vcpu_tb_trans);
    qemu_plugin_register_atexit_cb(id, plugin_exit, NULL);
    unsigned nhooks = 0;
    for (unsigned i = 0; i < g.nlocs; i++) {
        nhooks += g.locs[i].is_hook;
    }
    lt_log("%u locations and %u hooks at %u pcs, arm=%s, out=%s", g.nlocs - nhooks, nhooks, g.npcs,
           g.arm_boot ? "boot" : "marker", g.out_path);
    return 0;
}
