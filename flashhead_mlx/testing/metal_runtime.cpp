// The emulator's scheduler: runs a grid of threads with cooperative scheduling.
//
// The threads of a threadgroup are fibers (entered with setcontext, then switched with
// _setjmp/_longjmp, which skip the signal-mask syscalls) that run until they wait at a
// SIMD-group collective or a threadgroup barrier, or return. When no thread of a threadgroup can
// run, the scheduler resolves the collectives of each SIMD group over the lanes waiting at them,
// and else releases the barrier, which every thread must have reached. Threadgroups run in
// slots: one, in order, or with `shuffle` up to kSlots at once, interleaved at those points in a
// random order. Each slot has its own threadgroup memory (an arena poisoned with 0xff bytes when
// a threadgroup starts, each variable between red zones, 32 KiB at most).
//
// In the checking mode the kernel is compiled with -fsanitize=thread, which calls the
// __tsan_* hooks below at every load and store: threadgroup memory is checked for reads of
// bytes no thread wrote, accesses outside every variable, and races (two threads, one barrier
// interval, at least one write, not both atomic); device buffers for accesses outside them and
// races on outputs (two threadgroups of the dispatch, or two threads between the same barriers).
// With AddressSanitizer (the harness, metal_harness.cpp) the fiber switches are announced to it.
//
// Faults (out-of-bounds accesses hit the guard page after each buffer) and errors end the launch
// with a message instead of crashing the process.
#define EMU_RUNTIME
#include "metal_prelude.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace emu {
namespace {

enum State { kRun, kSimd, kBarrier, kDone };

struct Slot;

struct Thread {
  Lane lane;
  Slot* slot;
  ucontext_t context;  // the entry, for the first switch
  jmp_buf resume;      // where it waits, after that
  bool started;
  State state;
  Site barrier_site;
  void* fake_stack;    // AddressSanitizer's fake stack of the fiber
};

// Shadow of one byte of threadgroup memory or of an output in the checking mode: the last
// writes and reads (threadgroup, thread, barrier interval; kMany when several).
struct Cell {
  int32_t w_group, w_thread, r_group, r_thread;
  uint32_t w_epoch, r_epoch;
  uint8_t state;
};
enum CellState : uint8_t { kWritten = 1, kWritePlain = 2, kRead = 4, kReadPlain = 8 };
constexpr int32_t kMany = -1;

struct Variable {
  const void* tag;
  uint32_t offset, size;
  const char* name;
  int line;
};

constexpr size_t kStack = 256 << 10;
constexpr int kMaxThreads = 1024;
constexpr int kSlots = 4;
constexpr uint32_t kThreadgroupLimit = 32 << 10;  // Metal's maxThreadgroupMemoryLength
constexpr uint32_t kArena = 64 << 10;             // the limit plus the red zones
constexpr uint32_t kRedZone = 64;
constexpr int kMaxVariables = 64;

struct Slot {
  Grid grid;  // the dispatch, and this slot's threadgroup
  Thread* threads;
  ucontext_t entry;  // copied to each thread: it must outlive them (it holds their FPU state)
  char* stacks;
  int n;       // threads of the running threadgroup
  int group;   // its linear index, -1 when the slot is idle
  uint32_t epoch;
  char* arena;
  Cell* shadow;
  Variable vars[kMaxVariables];
  int n_vars;
  uint32_t end, declared;
};

struct Range {  // a buffer the checking mode knows: [start, start + bytes), its surroundings
  uintptr_t start, bytes, low, high;
  bool output;
  Cell* shadow;
};

struct Launch {
  void (*entry)();
  Slot slots[kSlots];
  int n_slots;
  Thread* current;
  jmp_buf scheduler;
  bool shuffle, check, guarded;
  uint64_t rng;
  double deadline;
  uint64_t ticks;
  int atomic;
  Range ranges[64];
  int n_ranges;
  sigjmp_buf exit;
  char message[512];
  pid_t tid;
  void* fault;
  void* scheduler_fake_stack;
  const void* scheduler_stack;
  size_t scheduler_stack_size;
};

Launch* L = nullptr;

bool same(const Site& a, const Site& b) {
  return a.line == b.line && strcmp(a.file, b.file) == 0;
}

size_t page_size() { return size_t(sysconf(_SC_PAGESIZE)); }

double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

uint64_t next_random() {
  L->rng ^= L->rng << 13;
  L->rng ^= L->rng >> 7;
  L->rng ^= L->rng << 17;
  return L->rng;
}

void permutation(int* order, int n) {
  for (int i = 0; i < n; i++) order[i] = i;
  if (!L->shuffle) return;
  for (int i = n - 1; i > 0; i--) {
    int j = int(next_random() % uint64_t(i + 1));
    int t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
}

// Fiber switches, announced to AddressSanitizer when it runs.
void to_fiber(Thread& t) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&L->scheduler_fake_stack, t.context.uc_stack.ss_sp,
                                 t.context.uc_stack.ss_size);
#endif
  if (t.started) _longjmp(t.resume, 1);
  t.started = true;
  setcontext(&t.context);
}

void in_fiber(Thread& t) {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, &L->scheduler_stack, &L->scheduler_stack_size);
#else
  (void)t;
#endif
}

[[noreturn]] void to_scheduler(Thread& t, bool done) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(done ? nullptr : &t.fake_stack, L->scheduler_stack,
                                 L->scheduler_stack_size);
#else
  (void)t;
  (void)done;
#endif
  _longjmp(L->scheduler, 1);
}

void in_scheduler() {
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(L->scheduler_fake_stack, nullptr, nullptr);
#endif
  L->current = nullptr;
}

void thread_main() {
  Thread& t = *L->current;
  in_fiber(t);
  L->entry();
  t.state = kDone;
  to_scheduler(t, true);
}

// Suspends the running thread and returns to the scheduler.
void yield(State state) {
  Thread& t = *L->current;
  t.state = state;
  if (!_setjmp(t.resume)) to_scheduler(t, false);
  in_fiber(t);
}

void on_fault(int, siginfo_t* info, void*) {
  if (L == nullptr || pid_t(syscall(SYS_gettid)) != L->tid) {
    signal(SIGSEGV, SIG_DFL);
    signal(SIGBUS, SIG_DFL);
    return;
  }
  L->fault = info->si_addr;
  snprintf(L->message, sizeof L->message, "memory fault at address %p", info->si_addr);
  siglongjmp(L->exit, 1);
}

[[noreturn]] void fault_at(uintptr_t address) {
  L->fault = reinterpret_cast<void*>(address);
  snprintf(L->message, sizeof L->message, "out-of-bounds access at address %p", L->fault);
  siglongjmp(L->exit, 1);
}

void poison(Slot& s, uint32_t offset, uint32_t bytes) {
#if EMU_ASAN
  ASAN_POISON_MEMORY_REGION(s.arena + offset, bytes);
#else
  (void)s, (void)offset, (void)bytes;
#endif
}

// Starts threadgroup `group` in slot s: its threads at their entry, fresh threadgroup memory.
void start_threadgroup(Slot& s, int group) {
  Grid& g = s.grid;
  s.group = group;
  g.origin[0] = uint32_t(group) % g.groups[0];
  g.origin[1] = uint32_t(group) / g.groups[0] % g.groups[1];
  g.origin[2] = uint32_t(group) / (g.groups[0] * g.groups[1]);
  for (int d = 0; d < 3; d++) {
    uint32_t left = g.grid[d] - g.origin[d] * g.group[d];
    g.size[d] = left < g.group[d] ? left : g.group[d];
  }
  s.n = int(g.size[0] * g.size[1] * g.size[2]);
  s.epoch = 0;
  if (s.end) {  // poison what the previous threadgroup used
#if EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(s.arena, s.end);
#endif
    memset(s.arena, 0xff, s.end);
    poison(s, 0, s.end);
    if (s.shadow) memset(s.shadow, 0, sizeof(Cell) * s.end);
  }
  s.n_vars = 0;
  s.end = kRedZone;
  s.declared = 0;
  for (int i = 0; i < s.n; i++) {
    Thread& t = s.threads[i];
    memset(&t.lane, 0, sizeof t.lane);
    t.slot = &s;
    t.lane.index = uint32_t(i);
    t.lane.pos[0] = uint32_t(i) % g.size[0];
    t.lane.pos[1] = uint32_t(i) / g.size[0] % g.size[1];
    t.lane.pos[2] = uint32_t(i) / (g.size[0] * g.size[1]);
    t.state = kRun;
    t.started = false;
    t.fake_stack = nullptr;
    t.context = s.entry;
    t.context.uc_stack.ss_sp = s.stacks + size_t(i) * kStack + page_size();
    t.context.uc_stack.ss_size = kStack - page_size();
    t.context.uc_link = nullptr;
    makecontext(&t.context, thread_main, 0);
  }
}

// Runs the threads of slot s until they all wait or return, then resolves what they wait at.
// Returns true when its threadgroup has finished.
bool step(Slot& s, int* order) {
  int n = s.n;
  permutation(order, n);
  for (int k = 0; k < n; k++) {
    Thread& t = s.threads[order[k]];
    if (t.state != kRun) continue;
    L->current = &t;
    if (_setjmp(L->scheduler)) {
      in_scheduler();
      continue;
    }
    to_fiber(t);
  }
  bool resolved = false;
  for (int sg = 0; sg < (n + 31) / 32; sg++) {
    Lane* lanes[32] = {};
    uint32_t waiting = 0;
    Collective collective = nullptr;
    Site site = {};
    for (int i = 0; i < 32 && 32 * sg + i < n; i++) {
      Thread& t = s.threads[32 * sg + i];
      lanes[i] = &t.lane;
      if (t.state != kSimd) continue;
      if (waiting && (t.lane.collective != collective || !same(t.lane.site, site))) {
        fail("the lanes of a SIMD group wait at different SIMD-group functions (divergent "
             "control flow around a collective)");
      }
      collective = t.lane.collective;
      site = t.lane.site;
      waiting |= 1u << i;
    }
    if (!waiting) continue;
    if (const char* error = collective(lanes, waiting)) fail(error);
    for (int i = 0; i < 32; i++)
      if (waiting >> i & 1) s.threads[32 * sg + i].state = kRun;
    resolved = true;
  }
  if (resolved) return false;
  int at_barrier = 0, done = 0;
  Site site = {};
  for (int i = 0; i < n; i++) {
    Thread& t = s.threads[i];
    if (t.state == kDone) {
      done++;
    } else if (t.state == kBarrier) {
      if (at_barrier++ && !same(t.barrier_site, site)) {
        fail("threads of a threadgroup wait at different threadgroup_barrier calls");
      }
      site = t.barrier_site;
    }
  }
  if (done == n) return true;
  if (done) {
    snprintf(L->message, sizeof L->message,
             "threadgroup_barrier: %d of %d threads returned without reaching it", done, n);
    siglongjmp(L->exit, 2);
  }
  s.epoch++;
  for (int i = 0; i < n; i++) s.threads[i].state = kRun;
  return false;
}

// Runs every threadgroup of the grid, in the slots.
void run_grid(int n_groups, int* order, int* group_order) {
  permutation(group_order, n_groups);
  int next = 0, active = 0;
  for (int k = 0; k < L->n_slots; k++) {
    L->slots[k].group = -1;
    if (next < n_groups) {
      start_threadgroup(L->slots[k], group_order[next++]);
      active++;
    }
  }
  int turn = 0;
  while (active) {
    turn = L->shuffle ? int(next_random() % uint64_t(L->n_slots)) : (turn + 1) % L->n_slots;
    Slot& s = L->slots[turn];
    if (s.group < 0 || !step(s, order)) continue;
    s.group = -1;
    if (next < n_groups) {
      start_threadgroup(s, group_order[next++]);
    } else {
      active--;
    }
  }
}

// ---- The checking mode -------------------------------------------------------------------

bool conflict(int32_t group, int32_t thread, uint32_t epoch, bool plain, int32_t g, int32_t t,
              uint32_t e, bool atomic) {
  bool other = group != g || (epoch == e && thread != t);
  return other && (plain || !atomic);
}

void record(int32_t& group, int32_t& thread, uint32_t& epoch, bool first, uint8_t& state,
            uint8_t plain_bit, int32_t g, int32_t t, uint32_t e, bool atomic) {
  if (first || (group == g && epoch != e)) {
    group = g, thread = t, epoch = e;
    state = uint8_t(state & ~plain_bit);
  } else if (group == g) {
    if (thread != t) thread = kMany;
  } else {
    group = kMany, thread = kMany;
  }
  if (!atomic) state |= plain_bit;
}

void describe_group(char* out, size_t size, int32_t group, int32_t thread) {
  if (group == kMany) {
    snprintf(out, size, "other threadgroups");
  } else if (thread == kMany) {
    snprintf(out, size, "threadgroup %d, several threads", group);
  } else {
    snprintf(out, size, "threadgroup %d thread %d", group, thread);
  }
}

// A byte the checking mode names in a message: of threadgroup variable `name` (declared at
// `line`), or of buffer `buffer` (named by the Python side).
struct Where {
  const char* name;
  int line, buffer;
  size_t byte;
};

void describe_byte(char* out, size_t size, const Where& w) {
  if (w.name) {
    snprintf(out, size, "byte %zu of '%s' (line %d)", w.byte, w.name, w.line);
  } else {
    snprintf(out, size, "byte %zu of {buffer %d}", w.byte, w.buffer);
  }
}

// One byte accessed by the running thread.
void check_cell(Cell& c, bool write, const char* memory, const Where& where) {
  Thread& t = *L->current;
  int32_t g = t.slot->group, id = int32_t(t.lane.index);
  uint32_t e = t.slot->epoch;
  bool atomic = L->atomic != 0;
  const char* clash = nullptr;
  int32_t other_group = 0, other_thread = 0;
  if ((c.state & kWritten) && conflict(c.w_group, c.w_thread, c.w_epoch, c.state & kWritePlain,
                                       g, id, e, atomic)) {
    clash = "wrote", other_group = c.w_group, other_thread = c.w_thread;
  } else if (write && (c.state & kRead) &&
             conflict(c.r_group, c.r_thread, c.r_epoch, c.state & kReadPlain, g, id, e, atomic)) {
    clash = "read", other_group = c.r_group, other_thread = c.r_thread;
  }
  if (clash) {
    char other[96], what[128];
    describe_group(other, sizeof other, other_group, other_thread);
    describe_byte(what, sizeof what, where);
    snprintf(L->message, sizeof L->message,
             "data race on %s memory: threadgroup %d thread %d %s %s, which %s %s %s%s", memory,
             g, id, write ? "writes" : "reads", what, other, clash,
             other_group == g ? "between the same barriers" : "in the same dispatch",
             atomic ? "" : " (not both atomic)");
    siglongjmp(L->exit, 2);
  }
  if (write) {
    record(c.w_group, c.w_thread, c.w_epoch, !(c.state & kWritten), c.state, kWritePlain, g, id,
           e, atomic);
    c.state |= kWritten;
  } else {
    record(c.r_group, c.r_thread, c.r_epoch, !(c.state & kRead), c.state, kReadPlain, g, id, e,
           atomic);
    c.state |= kRead;
  }
}

void check_threadgroup(Slot& s, uintptr_t address, size_t bytes, bool write) {
  uint32_t offset = uint32_t(address - uintptr_t(s.arena));
  const Variable* var = nullptr;
  for (int i = 0; i < s.n_vars; i++) {
    const Variable& v = s.vars[i];
    if (offset >= v.offset && offset + bytes <= v.offset + v.size) var = &v;
  }
  if (!var) {
    const Variable* near = nullptr;
    for (int i = 0; i < s.n_vars; i++) {  // the last variable that starts at or before offset
      if (!near || (s.vars[i].offset <= offset && s.vars[i].offset > near->offset)) {
        near = &s.vars[i];
      }
    }
    if (near && offset < near->offset) {
      snprintf(L->message, sizeof L->message,
               "out-of-bounds access to threadgroup memory: %u bytes before the start of '%s' "
               "(line %d, %u bytes)", near->offset - offset, near->name, near->line, near->size);
    } else if (near) {
      uint32_t end = near->offset + near->size;
      snprintf(L->message, sizeof L->message,
               "out-of-bounds access to threadgroup memory: %u bytes past the end of '%s' "
               "(line %d, %u bytes)", (offset > end ? offset : end) - end, near->name, near->line,
               near->size);
    } else {
      snprintf(L->message, sizeof L->message, "access to undeclared threadgroup memory");
    }
    siglongjmp(L->exit, 2);
  }
  for (size_t k = 0; k < bytes; k++) {
    Where where = {var->name, var->line, 0, offset + k - var->offset};
    Cell& c = s.shadow[offset + k];
    if (!write && !(c.state & kWritten)) {
      char what[128];
      describe_byte(what, sizeof what, where);
      snprintf(L->message, sizeof L->message,
               "read of uninitialised threadgroup memory: threadgroup %d thread %u reads %s, "
               "which no thread of its threadgroup wrote", s.group, L->current->lane.index, what);
      siglongjmp(L->exit, 2);
    }
    check_cell(c, write, "threadgroup", where);
  }
}

void check_access(const void* p, size_t bytes, bool write) {
  if (L == nullptr || !L->check || L->current == nullptr) return;
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  Slot& s = *L->current->slot;
  if (a >= uintptr_t(s.arena) && a < uintptr_t(s.arena) + kArena) {
    check_threadgroup(s, a, bytes, write);
    return;
  }
  for (int i = 0; i < L->n_ranges; i++) {
    Range& r = L->ranges[i];
    if (a + bytes <= r.low || a >= r.high) continue;
    uintptr_t end = r.start + r.bytes;
    if (a < r.start || a + bytes > end) fault_at(a < r.start || a >= end ? a : end);
    if (!r.output) return;
    for (size_t k = 0; k < bytes; k++) {
      check_cell(r.shadow[a + k - r.start], write, "device", Where{nullptr, 0, i, a + k - r.start});
    }
    return;
  }
}

}  // namespace

Lane* lane() { return &L->current->lane; }
const Grid* grid() { return &L->current->slot->grid; }

void simd_wait() { yield(kSimd); }

void barrier(Site site) {
  L->current->barrier_site = site;
  yield(kBarrier);
}

void atomic_begin() {
  L->atomic++;
  if (++L->ticks % (1u << 20) == 0 && now() > L->deadline) {
    fail("time limit exceeded in atomic operations (a spin-wait never ends: threads switch "
         "only at barriers and SIMD-group functions)");
  }
}

void atomic_end() { L->atomic--; }

void* threadgroup_memory(const void* tag, size_t size, size_t align, const char* name, int line) {
  Slot& s = *L->current->slot;
  for (int i = 0; i < s.n_vars; i++)
    if (s.vars[i].tag == tag) return s.arena + s.vars[i].offset;
  s.declared += uint32_t((size + 15) / 16 * 16);
  if (s.declared > kThreadgroupLimit) {
    snprintf(L->message, sizeof L->message,
             "threadgroup memory: %u bytes declared (with '%s', line %d), Metal allows %u",
             s.declared, name, line, kThreadgroupLimit);
    siglongjmp(L->exit, 2);
  }
  if (align < 16) align = 16;
  uint32_t offset = uint32_t((s.end + align - 1) / align * align);
  if (s.n_vars == kMaxVariables || offset + size + kRedZone > kArena) {
    fail("threadgroup memory: too many threadgroup variables for the emulator");
  }
  s.vars[s.n_vars++] = Variable{tag, offset, uint32_t(size), name, line};
  s.end = uint32_t(offset + size + kRedZone);
#if EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(s.arena + offset, size);
#endif
  return s.arena + offset;
}

void fail(const char* message) {
  snprintf(L->message, sizeof L->message, "%s", message);
  siglongjmp(L->exit, 2);
}

// Runs a grid. `config` holds grid[3], threadgroup[3], shuffle, seed, timeout (seconds),
// check; `ranges` holds n_ranges (start, bytes, low, high, is_output) of the buffers (the
// checking mode's; where guarded, a fault in [low, high) is reported at its address).
// Returns 0, 1 after an out-of-bounds access (its address in *fault), 2 after an error.
int launch(void (*entry)(), const int64_t* config, const int64_t* ranges, int n_ranges,
           char* message, int message_size, void** fault) {
  Launch* launch = new Launch();
  launch->entry = entry;
  Grid g = {};
  int n_max = 1;
  for (int d = 0; d < 3; d++) {
    g.grid[d] = uint32_t(config[d]);
    g.group[d] = uint32_t(config[d] < config[3 + d] ? config[d] : config[3 + d]);
    g.groups[d] = g.group[d] ? (g.grid[d] + g.group[d] - 1) / g.group[d] : 0;
    n_max *= int(g.group[d]);
  }
  // MLX checks the threadgroup as given, before clipping it to the grid.
  int64_t requested = config[3] * config[4] * config[5];
  if (requested > kMaxThreads) {
    snprintf(message, size_t(message_size),
             "threadgroup of %lld threads: at most %d per threadgroup", (long long)requested,
             kMaxThreads);
    delete launch;
    return 2;
  }
  int n_groups = int(g.groups[0] * g.groups[1] * g.groups[2]);
  if (n_groups == 0) {
    delete launch;
    return 0;
  }
  launch->shuffle = config[6] != 0;
  launch->rng = uint64_t(config[7]) * 0x9E3779B97F4A7C15ull + 1;
  launch->deadline = now() + double(config[8]);
  launch->check = config[9] != 0;
  launch->guarded = !EMU_ASAN;
  launch->tid = pid_t(syscall(SYS_gettid));
  launch->n_slots = launch->shuffle ? (n_groups < kSlots ? n_groups : kSlots) : 1;
  size_t page = page_size();
  for (int k = 0; k < launch->n_slots; k++) {
    Slot& s = launch->slots[k];
    s.grid = g;
    getcontext(&s.entry);
    s.threads = new Thread[n_max];
    s.stacks = static_cast<char*>(mmap(nullptr, size_t(n_max) * kStack, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    for (int i = 0; i < n_max; i++) mprotect(s.stacks + size_t(i) * kStack, page, PROT_NONE);
    s.arena = static_cast<char*>(aligned_alloc(64, kArena));
    memset(s.arena, 0xff, kArena);
    poison(s, 0, kArena);
    s.shadow = launch->check ? static_cast<Cell*>(calloc(kArena, sizeof(Cell))) : nullptr;
  }
  launch->n_ranges = n_ranges < 64 ? n_ranges : 64;
  for (int i = 0; i < launch->n_ranges; i++) {
    const int64_t* r = ranges + 5 * i;
    Range& range = launch->ranges[i];
    range = Range{uintptr_t(r[0]), uintptr_t(r[1]), uintptr_t(r[2]), uintptr_t(r[3]), r[4] != 0,
                  nullptr};
    if (launch->check && range.output) {
      range.shadow = static_cast<Cell*>(calloc(range.bytes ? range.bytes : 1, sizeof(Cell)));
    }
  }
  int* order = new int[n_max];
  int* group_order = new int[n_groups];

  static char alt_stack[1 << 16];
  stack_t alt = {}, old_alt;
  struct sigaction action = {}, old_segv, old_bus;
  if (launch->guarded) {
    alt.ss_sp = alt_stack;
    alt.ss_size = sizeof alt_stack;
    sigaltstack(&alt, &old_alt);
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &old_segv);
    sigaction(SIGBUS, &action, &old_bus);
  }

  L = launch;
  int status = sigsetjmp(launch->exit, 1);
  if (status == 0) run_grid(n_groups, order, group_order);
  L = nullptr;
  if (launch->guarded) {
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaltstack(&old_alt, nullptr);
  }
  snprintf(message, size_t(message_size), "%s", launch->message);
  *fault = launch->fault;
  delete[] group_order;
  delete[] order;
  for (int k = 0; k < launch->n_slots; k++) {
    Slot& s = launch->slots[k];
#if EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(s.arena, kArena);
#endif
    free(s.arena);
    free(s.shadow);
    delete[] s.threads;
    munmap(s.stacks, size_t(n_max) * kStack);
  }
  for (int i = 0; i < launch->n_ranges; i++) free(launch->ranges[i].shadow);
  delete launch;
  return status;
}

}  // namespace emu

// The hooks that -fsanitize=thread instrumentation calls (the checking mode; no ThreadSanitizer
// runtime is linked).
#define EMU_TSAN_SIZE(n)                                                                     \
  EMU_EXPORT void __tsan_read##n(void* p) { emu::check_access(p, n, false); }                \
  EMU_EXPORT void __tsan_write##n(void* p) { emu::check_access(p, n, true); }                \
  EMU_EXPORT void __tsan_unaligned_read##n(void* p) { emu::check_access(p, n, false); }      \
  EMU_EXPORT void __tsan_unaligned_write##n(void* p) { emu::check_access(p, n, true); }
EMU_TSAN_SIZE(1)
EMU_TSAN_SIZE(2)
EMU_TSAN_SIZE(4)
EMU_TSAN_SIZE(8)
EMU_TSAN_SIZE(16)
#undef EMU_TSAN_SIZE
EMU_EXPORT void __tsan_read_range(void* p, size_t n) { emu::check_access(p, n, false); }
EMU_EXPORT void __tsan_write_range(void* p, size_t n) { emu::check_access(p, n, true); }
EMU_EXPORT void __tsan_func_entry(void*) {}
EMU_EXPORT void __tsan_func_exit() {}
EMU_EXPORT void __tsan_init() {}
EMU_EXPORT void __tsan_vptr_read(void*) {}
EMU_EXPORT void __tsan_vptr_update(void*, void*) {}

// A buffer whose end touches a guard page (and whose start follows one), so that reading or
// writing past its end faults. The start is 16-byte aligned, as Metal buffers are.
EMU_EXPORT void* emu_alloc(size_t bytes, size_t* mapped) {
  size_t page = emu::page_size();
  size_t padded = (bytes + 15) / 16 * 16;
  size_t data_pages = (padded + page - 1) / page;
  *mapped = (data_pages + 2) * page;
  char* base = static_cast<char*>(
      mmap(nullptr, *mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) return nullptr;
  mprotect(base, page, PROT_NONE);
  mprotect(base + (data_pages + 1) * page, page, PROT_NONE);
  return base + (data_pages + 1) * page - padded;
}

EMU_EXPORT void emu_free(void* data, size_t mapped) {
  size_t page = emu::page_size();
  char* start = static_cast<char*>(data);
  char* base = start - reinterpret_cast<uintptr_t>(start) % page - page;
  munmap(base, mapped);
}
