// The emulator's scheduler: runs a grid of threads with cooperative scheduling.
//
// Threadgroups run one after the other. The threads of a threadgroup are fibers (entered with
// setcontext, then switched with _setjmp/_longjmp, which skip the signal-mask syscalls) that
// run until they wait at a SIMD-group collective or a threadgroup barrier, or return. When no
// thread can run, the scheduler resolves the collectives of each SIMD group over the lanes
// waiting at them, and else releases the barrier, which every thread must have reached. Faults
// (out-of-bounds accesses hit the guard page after each buffer) and errors end the launch with
// a message instead of crashing the process.
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
#include <cstring>

namespace emu {
namespace {

enum State { kRun, kSimd, kBarrier, kDone };

struct Thread {
  Lane lane;
  ucontext_t context;  // the entry, for the first switch
  jmp_buf resume;      // where it waits, after that
  bool started;
  State state;
  Site barrier_site;
};

constexpr size_t kStack = 256 << 10;
constexpr int kMaxThreads = 1024;

struct Launch {
  void (*entry)();
  Grid grid;
  Thread* threads;
  Thread* current;
  jmp_buf scheduler;
  char* stacks;
  bool shuffle;
  uint64_t rng;
  double deadline;
  uint64_t ticks;
  sigjmp_buf exit;
  char message[512];
  pid_t tid;
  void* fault;
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

void thread_main() {
  L->entry();
  L->current->state = kDone;
  _longjmp(L->scheduler, 1);
}

// Suspends the running thread and returns to the scheduler.
void yield(State state) {
  L->current->state = state;
  if (!_setjmp(L->current->resume)) _longjmp(L->scheduler, 1);
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

// Runs one threadgroup to the end.
void run_threadgroup(int* order) {
  const Grid& g = L->grid;
  int n = int(g.size[0] * g.size[1] * g.size[2]);
  ucontext_t entry;
  getcontext(&entry);
  for (int i = 0; i < n; i++) {
    Thread& t = L->threads[i];
    memset(&t.lane, 0, sizeof t.lane);
    t.lane.index = uint32_t(i);
    t.lane.pos[0] = uint32_t(i) % g.size[0];
    t.lane.pos[1] = uint32_t(i) / g.size[0] % g.size[1];
    t.lane.pos[2] = uint32_t(i) / (g.size[0] * g.size[1]);
    t.state = kRun;
    t.started = false;
    t.context = entry;
    t.context.uc_stack.ss_sp = L->stacks + size_t(i) * kStack + page_size();
    t.context.uc_stack.ss_size = kStack - page_size();
    t.context.uc_link = nullptr;
    makecontext(&t.context, thread_main, 0);
  }
  int n_groups = (n + 31) / 32;
  for (;;) {
    permutation(order, n);
    for (int k = 0; k < n; k++) {
      Thread& t = L->threads[order[k]];
      if (t.state != kRun) continue;
      L->current = &t;
      if (_setjmp(L->scheduler)) continue;
      if (t.started) _longjmp(t.resume, 1);
      t.started = true;
      setcontext(&t.context);
    }
    bool resolved = false;
    for (int s = 0; s < n_groups; s++) {
      Lane* lanes[32] = {};
      uint32_t waiting = 0;
      Collective collective = nullptr;
      Site site = {};
      for (int i = 0; i < 32 && 32 * s + i < n; i++) {
        Thread& t = L->threads[32 * s + i];
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
        if (waiting >> i & 1) L->threads[32 * s + i].state = kRun;
      resolved = true;
    }
    if (resolved) continue;
    int at_barrier = 0, done = 0;
    Site site = {};
    for (int i = 0; i < n; i++) {
      Thread& t = L->threads[i];
      if (t.state == kDone) {
        done++;
      } else if (t.state == kBarrier) {
        if (at_barrier++ && !same(t.barrier_site, site)) {
          fail("threads of a threadgroup wait at different threadgroup_barrier calls");
        }
        site = t.barrier_site;
      }
    }
    if (done == n) return;
    if (done) {
      snprintf(L->message, sizeof L->message,
               "threadgroup_barrier: %d of %d threads returned without reaching it", done, n);
      siglongjmp(L->exit, 2);
    }
    for (int i = 0; i < n; i++) L->threads[i].state = kRun;
  }
}

}  // namespace

Lane* lane() { return &L->current->lane; }
const Grid* grid() { return &L->grid; }

void simd_wait() { yield(kSimd); }

void barrier(Site site) {
  L->current->barrier_site = site;
  yield(kBarrier);
}

void atomic_tick() {
  if (++L->ticks % (1u << 20) == 0 && now() > L->deadline) {
    fail("time limit exceeded in atomic operations (a spin-wait never ends: threads switch "
         "only at barriers and SIMD-group functions)");
  }
}

void fail(const char* message) {
  snprintf(L->message, sizeof L->message, "%s", message);
  siglongjmp(L->exit, 2);
}

// Runs a grid; `config` holds grid[3], threadgroup[3], shuffle, seed, timeout (seconds).
// Returns 0, 1 after a memory fault (its address in *fault), 2 after an error.
int launch(void (*entry)(), const int64_t* config, char* message, int message_size,
           void** fault) {
  Launch launch = {};
  launch.entry = entry;
  Grid& g = launch.grid;
  int n_max = 1;
  for (int d = 0; d < 3; d++) {
    g.grid[d] = uint32_t(config[d]);
    g.group[d] = uint32_t(config[d] < config[3 + d] ? config[d] : config[3 + d]);
    g.groups[d] = g.group[d] ? (g.grid[d] + g.group[d] - 1) / g.group[d] : 0;
    n_max *= int(g.group[d]);
  }
  if (n_max > kMaxThreads) {
    snprintf(message, size_t(message_size),
             "threadgroup of %d threads: at most %d per threadgroup", n_max, kMaxThreads);
    return 2;
  }
  int n_groups = int(g.groups[0] * g.groups[1] * g.groups[2]);
  if (n_groups == 0) return 0;
  launch.shuffle = config[6] != 0;
  launch.rng = uint64_t(config[7]) * 0x9E3779B97F4A7C15ull + 1;
  launch.deadline = now() + double(config[8]);
  launch.tid = pid_t(syscall(SYS_gettid));
  launch.stacks = static_cast<char*>(mmap(nullptr, size_t(n_max) * kStack, PROT_READ | PROT_WRITE,
                                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  for (int i = 0; i < n_max; i++) mprotect(launch.stacks + size_t(i) * kStack, page_size(), PROT_NONE);
  Thread* threads = new Thread[n_max];
  int* order = new int[n_max];
  int* group_order = new int[n_groups];
  launch.threads = threads;

  static char alt_stack[1 << 16];
  stack_t alt = {}, old_alt;
  alt.ss_sp = alt_stack;
  alt.ss_size = sizeof alt_stack;
  sigaltstack(&alt, &old_alt);
  struct sigaction action = {}, old_segv, old_bus;
  action.sa_sigaction = on_fault;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  sigaction(SIGSEGV, &action, &old_segv);
  sigaction(SIGBUS, &action, &old_bus);

  L = &launch;
  int status = sigsetjmp(launch.exit, 1);
  if (status == 0) {
    permutation(group_order, n_groups);
    for (int k = 0; k < n_groups; k++) {
      int i = group_order[k];
      g.origin[0] = uint32_t(i) % g.groups[0];
      g.origin[1] = uint32_t(i) / g.groups[0] % g.groups[1];
      g.origin[2] = uint32_t(i) / (g.groups[0] * g.groups[1]);
      for (int d = 0; d < 3; d++) {
        uint32_t left = g.grid[d] - g.origin[d] * g.group[d];
        g.size[d] = left < g.group[d] ? left : g.group[d];
      }
      run_threadgroup(order);
    }
  }
  L = nullptr;
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  sigaltstack(&old_alt, nullptr);
  snprintf(message, size_t(message_size), "%s", launch.message);
  *fault = launch.fault;
  delete[] group_order;
  delete[] order;
  delete[] threads;
  munmap(launch.stacks, size_t(n_max) * kStack);
  return status;
}

}  // namespace emu

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
