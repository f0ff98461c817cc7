// The emulated CUDA execution model declared in prelude.h: fibers, the block scheduler, warp collectives,
// ldmatrix, mma.sync, cp.async and kernel launches. x86-64 only (one small assembly routine switches contexts).
#include "prelude.h"

#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <vector>

// Saves the callee-saved registers, MXCSR and the x87 control word of the running context on its stack, stores
// its stack pointer in *save and resumes the context whose stack pointer is `load`.
extern "C" void pointins_emu_switch_context(void** save, void* load);
asm(R"(
  .text
  .globl pointins_emu_switch_context
  .type pointins_emu_switch_context, @function
pointins_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pointins_emu_switch_context, .-pointins_emu_switch_context
)");

namespace emu {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr std::size_t kSmemGuard = 64 * 1024;
constexpr unsigned char kGuardByte = 0xA5;
constexpr std::size_t kGuardBytes = 4096;

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes, src_bytes;
};

enum class State { Ready, AtBarrier, AtWarp, Done, Failed };

struct Fiber {
  void* sp = nullptr;
  unsigned char* mapping = nullptr;  // guard page + stack
  int tid = 0;
  State state = State::Ready;
  long warp_sequence = 0;
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> committed;
};

struct WarpExchange {
  alignas(16) unsigned char in[2][32][kSlotBytes];
  alignas(16) unsigned char out[2][32][kSlotBytes];
  int arrived[2] = {0, 0};
  const char* op[2] = {nullptr, nullptr};
};

struct Worker;
thread_local Worker* current_worker = nullptr;
thread_local Fiber* current_fiber = nullptr;

std::mutex attribute_mutex;
std::unordered_map<const void*, std::size_t> smem_optin;
std::atomic<long> launches{0};
std::atomic<bool> recording_launches{false};
std::mutex records_mutex;
std::ostringstream records;

uint64_t seed_from_environment() {
  const char* text = std::getenv("POINTINS_EMU_SEED");
  return text != nullptr ? std::strtoull(text, nullptr, 10) : 1;
}

struct Worker {
  std::vector<Fiber> fibers;
  std::vector<WarpExchange> warps;
  void* scheduler_sp = nullptr;
  std::deque<int> ready;
  int at_barrier = 0;
  int live = 0;
  std::vector<unsigned char> smem;
  dim3 block_index;
  const LaunchConfig* config = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
  std::mt19937_64 rng;

  explicit Worker(int threads) : fibers(threads), warps(threads / 32) {
    for (int t = 0; t < threads; ++t) {
      void* mapping = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                           -1, 0);
      if (mapping == MAP_FAILED) throw std::runtime_error("emulation: cannot allocate a fiber stack");
      mprotect(mapping, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting memory
      fibers[t].mapping = static_cast<unsigned char*>(mapping);
      fibers[t].tid = t;
    }
  }
  ~Worker() {
    for (Fiber& f : fibers) munmap(f.mapping, kStackBytes + kGuardBytes);
  }

  void push_ready_shuffled(std::vector<int>& tids) {
    std::shuffle(tids.begin(), tids.end(), rng);
    for (int t : tids) {
      fibers[t].state = State::Ready;
      ready.push_back(t);
    }
  }

  std::string where() const {
    std::ostringstream s;
    s << " [block (" << block_index.x << ", " << block_index.y << ", " << block_index.z << ")";
    if (current_fiber != nullptr) s << ", thread " << current_fiber->tid;
    s << "]";
    return s.str();
  }

  void run_block(unsigned long linear);
};

void fiber_entry();

void prepare_stack(Fiber& f) {
  // The first switch into the fiber pops the saved-register area and returns into fiber_entry, whose frame
  // then starts 8 bytes below a 16-byte boundary, as after a call.
  auto top = reinterpret_cast<uintptr_t>(f.mapping + kGuardBytes + kStackBytes) & ~uintptr_t{15};
  auto* slots = reinterpret_cast<uint64_t*>(top);
  slots[-1] = 0;                                            // fiber_entry's (unused) return address
  slots[-2] = reinterpret_cast<uint64_t>(&fiber_entry);     // where the switch's `ret` goes
  for (int r = 3; r <= 8; ++r) slots[-r] = 0;               // rbp, rbx, r12..r15
  uint32_t control[2] = {0x1F80u, 0x037Fu};                 // default MXCSR and x87 control word
  std::memcpy(&slots[-9], control, 8);
  f.sp = &slots[-9];
}

void yield_to_scheduler() {
  Fiber* f = current_fiber;
  pointins_emu_switch_context(&f->sp, current_worker->scheduler_sp);
}

void fiber_entry() {
  Worker* w = current_worker;
  try {
    (*w->body)();
  } catch (const std::exception& error) {
    fail(std::string("exception in kernel: ") + error.what());
  }
  Fiber* f = current_fiber;
  f->state = State::Done;
  --w->live;
  pointins_emu_switch_context(&f->sp, w->scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

void Worker::run_block(unsigned long linear) {
  const dim3 grid = config->grid;
  block_index = dim3(static_cast<unsigned>(linear % grid.x), static_cast<unsigned>((linear / grid.x) % grid.y),
                     static_cast<unsigned>(linear / (static_cast<unsigned long>(grid.x) * grid.y)));
  rng.seed(seed_from_environment() * 0x9E3779B97F4A7C15ull + linear);
  // Uninitialised shared memory reads as NaN; a guard band after it catches writes past the end.
  smem.assign(config->smem + kSmemGuard, 0xFF);
  std::memset(smem.data() + config->smem, kGuardByte, kSmemGuard);
  for (auto& x : warps) x = WarpExchange();
  ready.clear();
  at_barrier = 0;
  live = static_cast<int>(fibers.size());
  std::vector<int> order(fibers.size());
  for (std::size_t t = 0; t < fibers.size(); ++t) {
    Fiber& f = fibers[t];
    f.state = State::Ready;
    f.warp_sequence = 0;
    f.open_group.clear();
    f.committed.clear();
    prepare_stack(f);
    order[t] = static_cast<int>(t);
  }
  push_ready_shuffled(order);
  while (error.empty()) {
    if (ready.empty()) {
      if (live == 0) break;
      int barrier = 0, warp = 0, done = 0;
      std::string ops;
      for (const Fiber& f : fibers) {
        barrier += f.state == State::AtBarrier;
        done += f.state == State::Done;
        if (f.state == State::AtWarp) {
          ++warp;
          const WarpExchange& x = warps[f.tid / 32];
          const char* op = x.op[(f.warp_sequence - 1) & 1];
          if (op != nullptr && ops.find(op) == std::string::npos) ops += std::string(" ") + op;
        }
      }
      std::ostringstream s;
      s << "deadlock: " << barrier << " threads wait at __syncthreads, " << warp << " at warp collectives (" << ops
        << " ), " << done << " have exited (a barrier or warp collective must be reached by every thread)";
      error = s.str() + where();
      break;
    }
    const int t = ready.front();
    ready.pop_front();
    current_fiber = &fibers[t];
    pointins_emu_switch_context(&scheduler_sp, fibers[t].sp);
    current_fiber = nullptr;
  }
  for (std::size_t i = config->smem; i < smem.size() && error.empty(); ++i) {
    if (smem[i] != kGuardByte) {
      error = "a store past the end of the block's " + std::to_string(config->smem) +
              " bytes of dynamic shared memory (byte " + std::to_string(i) + ")" + where();
    }
  }
}

Worker& worker() {
  if (current_worker == nullptr || current_fiber == nullptr) {
    throw std::runtime_error("emulation: a device function was called outside a kernel");
  }
  return *current_worker;
}

bool in_shared(const Worker& w, const void* p, std::size_t bytes) {
  auto address = reinterpret_cast<uintptr_t>(p);
  auto base = reinterpret_cast<uintptr_t>(w.smem.data());
  return address >= base && address + bytes <= base + w.config->smem;
}

std::string hex(const void* p) {
  std::ostringstream s;
  s << p;
  return s.str();
}

// --- collective implementations (run by the last lane to arrive) ---

struct LdmatrixArgs {
  int count;
  bool trans;
  Worker* worker;
};

void complete_ldmatrix(const unsigned char* in, unsigned char* out, const void* context) {
  const auto& args = *static_cast<const LdmatrixArgs*>(context);
  uint16_t m[4][8][8];
  for (int i = 0; i < args.count; ++i) {
    for (int r = 0; r < 8; ++r) {
      const void* row;
      std::memcpy(&row, in + (8 * i + r) * kSlotBytes, sizeof(row));
      if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        fail("ldmatrix: row address " + hex(row) + " of lane " + std::to_string(8 * i + r) +
             " is not 16-byte aligned");
      }
      if (!in_shared(*args.worker, row, 16)) {
        fail("ldmatrix: row address " + hex(row) + " of lane " + std::to_string(8 * i + r) +
             " is outside the block's shared memory");
      }
      std::memcpy(m[i][r], row, 16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t regs[4];
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < args.count; ++i) {
      const uint16_t lo = args.trans ? m[i][2 * t][g] : m[i][g][2 * t];
      const uint16_t hi = args.trans ? m[i][2 * t + 1][g] : m[i][g][2 * t + 1];
      regs[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    std::memcpy(out + lane * kSlotBytes, regs, 4 * args.count);
  }
}

struct MmaInput {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

double decode(uint32_t bits16, int kind) {
  if (kind == 0) {
    uint32_t f = bits16 << 16;
    return __uint_as_float(f);
  }
  c10::Half h;
  h.x = static_cast<uint16_t>(bits16);
  return static_cast<float>(h);
}

void complete_mma(const unsigned char* in, unsigned char* out, const void* context) {
  const int kind = *static_cast<const int*>(context);
  double A[16][16] = {}, B[16][8] = {}, C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    MmaInput x;
    std::memcpy(&x, in + lane * kSlotBytes, sizeof(x));
    const int g = lane / 4, t = lane % 4;
    if (kind == 2) {  // tf32: the tensor core reads the top 19 bits of each operand
      auto tf32 = [](uint32_t bits) { return static_cast<double>(__uint_as_float(bits & 0xFFFFE000u)); };
      A[g][t] = tf32(x.a[0]);
      A[g + 8][t] = tf32(x.a[1]);
      A[g][t + 4] = tf32(x.a[2]);
      A[g + 8][t + 4] = tf32(x.a[3]);
      B[t][g] = tf32(x.b[0]);
      B[t + 4][g] = tf32(x.b[1]);
    } else {
      const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int r = 0; r < 4; ++r) {
        A[rows[r]][cols[r]] = decode(x.a[r] & 0xFFFFu, kind);
        A[rows[r]][cols[r] + 1] = decode(x.a[r] >> 16, kind);
      }
      for (int r = 0; r < 2; ++r) {
        B[2 * t + 8 * r][g] = decode(x.b[r] & 0xFFFFu, kind);
        B[2 * t + 8 * r + 1][g] = decode(x.b[r] >> 16, kind);
      }
    }
    C[g][2 * t] = x.c[0];
    C[g][2 * t + 1] = x.c[1];
    C[g + 8][2 * t] = x.c[2];
    C[g + 8][2 * t + 1] = x.c[3];
  }
  const int depth = kind == 2 ? 8 : 16;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    float d[4];
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int e = 0; e < 4; ++e) {
      double sum = C[rows[e]][cols[e]];
      for (int k = 0; k < depth; ++k) sum += A[rows[e]][k] * B[k][cols[e]];
      d[e] = static_cast<float>(sum);
    }
    std::memcpy(out + lane * kSlotBytes, d, sizeof(d));
  }
}

void complete_ballot(const unsigned char* in, unsigned char* out, const void*) {
  uint32_t bits = 0;
  for (int lane = 0; lane < 32; ++lane) bits |= static_cast<uint32_t>(in[lane * kSlotBytes] != 0) << lane;
  for (int lane = 0; lane < 32; ++lane) std::memcpy(out + lane * kSlotBytes, &bits, 4);
}

void complete_match(const unsigned char* in, unsigned char* out, const void*) {
  uint64_t v[32];
  for (int lane = 0; lane < 32; ++lane) std::memcpy(&v[lane], in + lane * kSlotBytes, 8);
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t bits = 0;
    for (int other = 0; other < 32; ++other) bits |= static_cast<uint32_t>(v[other] == v[lane]) << other;
    std::memcpy(out + lane * kSlotBytes, &bits, 4);
  }
}

void complete_shfl(const unsigned char* in, unsigned char* out, const void*) {
  for (int lane = 0; lane < 32; ++lane) {
    int mode, operand;
    std::memcpy(&mode, in + lane * kSlotBytes + 8, 4);
    std::memcpy(&operand, in + lane * kSlotBytes + 12, 4);
    int source = lane;
    if (mode == 0) source = operand & 31;
    if (mode == 1) source = lane ^ (operand & 31);
    if (mode == 2 && lane + operand < 32) source = lane + operand;
    if (mode == 3 && lane - operand >= 0) source = lane - operand;
    std::memcpy(out + lane * kSlotBytes, in + source * kSlotBytes, 8);
  }
}

void complete_nothing(const unsigned char*, unsigned char*, const void*) {}

void check_full_mask(unsigned mask, const char* op) {
  if (mask != 0xffffffffu) fail(std::string(op) + ": only full-warp masks are used (and emulated)");
}

}  // namespace

// --- public entry points ---

dim3 thread_idx() { return dim3(static_cast<unsigned>(worker(), current_fiber->tid)); }
dim3 block_idx() { return worker().block_index; }
dim3 grid_dim() { return worker().config->grid; }
dim3 block_dim() { return worker().config->block; }
unsigned char* dynamic_smem() { return worker().smem.data(); }

void fail(const std::string& message) {
  if (current_worker == nullptr || current_fiber == nullptr) throw std::runtime_error("emulation: " + message);
  Worker& w = *current_worker;
  if (w.error.empty()) w.error = message + w.where();
  current_fiber->state = State::Failed;
  pointins_emu_switch_context(&current_fiber->sp, w.scheduler_sp);
  std::abort();
}

void sync_block() {
  Worker& w = worker();
  current_fiber->state = State::AtBarrier;
  if (++w.at_barrier == static_cast<int>(w.fibers.size())) {
    w.at_barrier = 0;
    std::vector<int> all(w.fibers.size());
    for (std::size_t t = 0; t < all.size(); ++t) all[t] = static_cast<int>(t);
    w.push_ready_shuffled(all);  // the next phase starts in a new random order, this thread included
  }
  yield_to_scheduler();
}

void collective(const char* op, const void* in, int in_bytes, void* out, int out_bytes, Complete complete,
                const void* context) {
  Worker& w = worker();
  Fiber* f = current_fiber;
  const int lane = f->tid % 32;
  WarpExchange& x = w.warps[f->tid / 32];
  const int s = static_cast<int>(f->warp_sequence++ & 1);
  if (x.arrived[s] == 0) {
    x.op[s] = op;
  } else if (std::strcmp(x.op[s], op) != 0) {
    fail(std::string("lanes of one warp met different warp collectives: ") + x.op[s] + " and " + op);
  }
  std::memcpy(x.in[s][lane], in, in_bytes);
  if (++x.arrived[s] == 32) {
    complete(&x.in[s][0][0], &x.out[s][0][0], context);
    x.arrived[s] = 0;
    std::vector<int> others;
    for (int l = 0; l < 32; ++l) {
      if (l != lane) others.push_back(f->tid - lane + l);
    }
    w.push_ready_shuffled(others);
  } else {
    f->state = State::AtWarp;
    yield_to_scheduler();
  }
  std::memcpy(out, x.out[s][lane], out_bytes);
}

void sync_warp(unsigned mask) {
  check_full_mask(mask, "__syncwarp");
  collective("__syncwarp", nullptr, 0, nullptr, 0, complete_nothing);
}

unsigned ballot(unsigned mask, bool predicate) {
  check_full_mask(mask, "__ballot_sync");
  const unsigned char in = predicate;
  uint32_t out;
  collective("__ballot_sync", &in, 1, &out, 4, complete_ballot);
  return out;
}

unsigned match_any(unsigned mask, uint64_t value) {
  check_full_mask(mask, "__match_any_sync");
  uint32_t out;
  collective("__match_any_sync", &value, 8, &out, 4, complete_match);
  return out;
}

uint64_t shfl_bits(unsigned mask, uint64_t bits, int mode, int operand) {
  check_full_mask(mask, "__shfl_sync");
  unsigned char in[16];
  std::memcpy(in, &bits, 8);
  std::memcpy(in + 8, &mode, 4);
  std::memcpy(in + 12, &operand, 4);
  uint64_t out;
  collective("__shfl_sync", in, 16, &out, 8, complete_shfl);
  return out;
}

void ldmatrix(uint32_t* regs, int count, bool trans, const void* row) {
  static const char* names[2][5] = {{"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
                                    {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
  if (count != 1 && count != 2 && count != 4) fail("ldmatrix: .x1, .x2 or .x4 only");
  const LdmatrixArgs args{count, trans, &worker()};
  collective(names[trans][count], &row, sizeof(row), regs, 4 * count, complete_ldmatrix, &args);
}

void mma(float* d, const uint32_t* a, const uint32_t* b, int kind) {
  static const char* names[3] = {"mma.m16n8k16.bf16", "mma.m16n8k16.f16", "mma.m16n8k8.tf32"};
  MmaInput x;
  std::memcpy(x.a, a, sizeof(x.a));
  std::memcpy(x.b, b, sizeof(x.b));
  std::memcpy(x.c, d, sizeof(x.c));
  static const int kinds[3] = {0, 1, 2};
  collective(names[kind], &x, sizeof(x), d, 16, complete_mma, &kinds[kind]);
}

void cp_async(void* smem, const void* global, int bytes, int src_bytes) {
  Worker& w = worker();
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async: the copy size must be 4, 8 or 16 bytes");
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async: src-size must lie in [0, cp-size]");
  if (reinterpret_cast<uintptr_t>(smem) % bytes != 0 || reinterpret_cast<uintptr_t>(global) % bytes != 0) {
    fail("cp.async: addresses must be aligned to the copy size (" + std::to_string(bytes) + " bytes); got shared " +
         hex(smem) + ", global " + hex(global));
  }
  if (!in_shared(w, smem, bytes)) fail("cp.async: destination " + hex(smem) + " is outside the block's shared memory");
  if (in_shared(w, global, 1)) fail("cp.async: the source must be global memory");
  auto* dst = static_cast<unsigned char*>(smem);
  std::memset(dst, 0xFF, bytes);  // until the group is waited for, the destination holds garbage
  current_fiber->open_group.push_back({dst, static_cast<const unsigned char*>(global), bytes, src_bytes});
}

void cp_async_commit() {
  Fiber* f = (worker(), current_fiber);
  f->committed.push_back(std::move(f->open_group));
  f->open_group.clear();
}

void cp_async_wait(int pending_groups) {
  Fiber* f = (worker(), current_fiber);
  while (static_cast<int>(f->committed.size()) > pending_groups) {
    for (const Copy& c : f->committed.front()) {
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
    f->committed.pop_front();
  }
}

void set_max_dynamic_smem(const void* kernel, std::size_t bytes) {
  if (bytes > kMaxSharedOptin) {
    throw std::runtime_error("emulation: cudaFuncSetAttribute: " + std::to_string(bytes) +
                             " bytes of dynamic shared memory exceed the device's " + std::to_string(kMaxSharedOptin));
  }
  std::lock_guard<std::mutex> lock(attribute_mutex);
  smem_optin[kernel] = bytes;
}

long launch_count() { return launches.load(); }

void set_recording(bool on) { recording_launches = on; }
bool recording() { return recording_launches.load(); }
std::string take_records() {
  std::lock_guard<std::mutex> lock(records_mutex);
  std::string text = records.str();
  records.str("");
  return text;
}

void run_launch(const LaunchConfig& config, const std::function<void()>& body) {
  ++launches;
  const dim3 g = config.grid, b = config.block;
  std::ostringstream bad;
  if (b.y != 1 || b.z != 1 || b.x < 32 || b.x > 1024 || b.x % 32 != 0) {
    bad << "block (" << b.x << ", " << b.y << ", " << b.z << "): the kernels use 1-D blocks of whole warps";
  } else if (g.x < 1 || g.y < 1 || g.z < 1 || g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    bad << "grid (" << g.x << ", " << g.y << ", " << g.z << ") exceeds the launch limits";
  } else if (config.smem > kDefaultSharedLimit) {
    std::lock_guard<std::mutex> lock(attribute_mutex);
    auto found = smem_optin.find(config.kernel);
    if (found == smem_optin.end() || found->second < config.smem) {
      bad << config.smem << " bytes of dynamic shared memory need cudaFuncSetAttribute(..., "
          << "cudaFuncAttributeMaxDynamicSharedMemorySize) first";
    }
  }
  if (!bad.str().empty()) throw std::runtime_error("emulation: invalid launch: " + bad.str());
  if (recording_launches.load()) {
    Dl_info info{};
    const auto address = reinterpret_cast<std::uintptr_t>(config.kernel);
    const std::uintptr_t base =
        dladdr(config.kernel, &info) != 0 ? reinterpret_cast<std::uintptr_t>(info.dli_fbase) : 0;
    std::lock_guard<std::mutex> lock(records_mutex);
    records << std::hex << (address - base) << std::dec << ' ' << g.x << ' ' << g.y << ' ' << g.z << ' ' << b.x
            << ' ' << config.smem << '\n';
    return;
  }

  const unsigned long blocks = static_cast<unsigned long>(g.x) * g.y * g.z;
  const char* text = std::getenv("POINTINS_EMU_THREADS");
  unsigned workers = text != nullptr ? static_cast<unsigned>(std::atoi(text)) : std::thread::hardware_concurrency();
  workers = std::max(1u, std::min<unsigned>({workers, 2u * 4u, static_cast<unsigned>(std::min(blocks, 1024ul))}));
  std::atomic<unsigned long> next{0};
  std::atomic<bool> stop{false};
  std::mutex error_mutex;
  std::string first_error;
  auto work = [&] {
    try {
      Worker w(static_cast<int>(b.x));
      w.config = &config;
      w.body = &body;
      current_worker = &w;
      while (!stop.load()) {
        const unsigned long linear = next++;
        if (linear >= blocks) break;
        w.run_block(linear);
        if (!w.error.empty()) {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (first_error.empty()) first_error = w.error;
          stop = true;
        }
      }
      current_worker = nullptr;
    } catch (const std::exception& error) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (first_error.empty()) first_error = error.what();
      stop = true;
    }
  };
  std::vector<std::thread> pool;
  for (unsigned i = 1; i < workers; ++i) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (!first_error.empty()) throw std::runtime_error("emulation: " + first_error);
}

}  // namespace emu
