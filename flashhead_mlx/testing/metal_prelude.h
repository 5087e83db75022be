// The subset of the Metal Shading Language that the CPU emulator implements.
//
// Every kernel source the emulator runs is compiled as C++ after this header. The first part
// (namespace emu) is the interface to the scheduler in metal_runtime.cpp; the rest maps Metal
// onto C++: address-space qualifiers, scalar and vector types (half is _Float16, bfloat16_t a
// rounding struct), metal:: math, atomics, and the SIMD-group and threadgroup functions, which
// yield to the scheduler. Anything not defined here fails to compile.
#pragma once

// The Metal Shading Language version the kernel is compiled as: 310 (MLX on macOS 14) or 320.
#ifndef EMU_MSL
#define EMU_MSL 320
#endif

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace emu {

// A pending SIMD-group collective: lanes[i] is lane i (null where the lane does not exist),
// `waiting` the lanes that wait at this collective. Returns an error message or null.
struct Lane;
typedef const char* (*Collective)(Lane* const* lanes, uint32_t waiting);

// Where a barrier or SIMD-group function is called in the kernel source.
struct Site {
  const char* file;
  int line;
};

struct Lane {
  uint32_t pos[3];      // thread_position_in_threadgroup
  uint32_t index;       // thread_index_in_threadgroup
  const void* in;       // the collective's argument (a T*)
  void* out;            // its result (a T*)
  uint32_t arg;         // the lane, delta or mask argument
  Collective collective;
  Site site;            // to catch lanes that wait at different collectives
};

struct Grid {
  uint32_t grid[3];     // threads in the grid
  uint32_t group[3];    // threads per threadgroup at dispatch
  uint32_t groups[3];   // threadgroups in the grid
  uint32_t origin[3];   // threadgroup_position_in_grid of the running threadgroup
  uint32_t size[3];     // its threads (smaller than `group` at the edges of the grid)
};

Lane* lane();
const Grid* grid();
void simd_wait();
void barrier(Site site);
void atomic_begin();  // an atomic operation starts (the checking mode tags its accesses)
void atomic_end();
// The storage of a threadgroup variable (declaration `tag`) in the running threadgroup.
void* threadgroup_memory(const void* tag, size_t size, size_t align, const char* name, int line);
[[noreturn]] void fail(const char* message);
int launch(void (*entry)(), const int64_t* config, const int64_t* ranges, int n_ranges,
           char* message, int message_size, void** fault);

}  // namespace emu

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

#ifndef EMU_RUNTIME

#define EMU_INLINE inline __attribute__((always_inline))
// Trailing parameters that record the caller's source location.
#define EMU_HERE const char *file_ = __builtin_FILE(), int line_ = __builtin_LINE()
#define EMU_SITE emu::Site{file_, line_}

// Address spaces are plain memory. The emulator rewrites threadgroup variable declarations to
// references into the running threadgroup's memory (emu::threadgroup_memory) before compiling;
// as a qualifier `threadgroup` is empty.
#define device
#define constant
#define thread
#define threadgroup
#define METAL_FUNC inline
#define MLX_MTL_PRAGMA_UNROLL
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define MAXFLOAT __FLT_MAX__
#define HUGE_VALF __builtin_inff()
#define FLT_MAX __FLT_MAX__
#define FLT_MIN __FLT_MIN__

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;
typedef half float16_t;

// ------------------------------------------------------------------------------------------
// bfloat16: stored as the top 16 bits of a float, rounded to nearest even (as MLX does).

namespace emu {

template <class T>
constexpr bool is_builtin_scalar = std::is_arithmetic<T>::value || std::is_same<T, half>::value;

constexpr uint16_t float_to_bf16(float f) {
  uint32_t bits = __builtin_bit_cast(uint32_t, f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return uint16_t((bits >> 16) | 0x40);
  }
  return uint16_t((bits + (0x7fffu + ((bits >> 16) & 1u))) >> 16);
}

constexpr float bf16_to_float(uint16_t b) {
  return __builtin_bit_cast(float, uint32_t(b) << 16);
}

}  // namespace emu

struct bfloat16_t {
  uint16_t bits_;
  bfloat16_t() = default;
  template <class T, std::enable_if_t<emu::is_builtin_scalar<T>, int> = 0>
  constexpr bfloat16_t(T x) : bits_(emu::float_to_bf16(static_cast<float>(x))) {}
  constexpr operator float() const { return emu::bf16_to_float(bits_); }
};
typedef bfloat16_t bfloat;

#define EMU_BF16_BINOP(op)                                                                    \
  constexpr bfloat16_t operator op(bfloat16_t a, bfloat16_t b) {                              \
    return bfloat16_t(float(a) op float(b));                                                  \
  }                                                                                           \
  constexpr float operator op(bfloat16_t a, float b) { return float(a) op b; }                \
  constexpr float operator op(float a, bfloat16_t b) { return a op float(b); }                \
  constexpr float operator op(bfloat16_t a, half b) { return float(a) op float(b); }          \
  constexpr float operator op(half a, bfloat16_t b) { return float(a) op float(b); }          \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>                   \
  constexpr bfloat16_t operator op(bfloat16_t a, I b) {                                       \
    return bfloat16_t(float(a) op float(b));                                                  \
  }                                                                                           \
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>                   \
  constexpr bfloat16_t operator op(I a, bfloat16_t b) {                                       \
    return bfloat16_t(float(a) op float(b));                                                  \
  }                                                                                           \
  template <class T>                                                                          \
  constexpr bfloat16_t& operator op##=(bfloat16_t& a, T b) {                                  \
    a = bfloat16_t(float(a) op float(b));                                                     \
    return a;                                                                                 \
  }
EMU_BF16_BINOP(+)
EMU_BF16_BINOP(-)
EMU_BF16_BINOP(*)
EMU_BF16_BINOP(/)

#define EMU_BF16_CMP(op)                                                                      \
  constexpr bool operator op(bfloat16_t a, bfloat16_t b) { return float(a) op float(b); }     \
  template <class T, std::enable_if_t<emu::is_builtin_scalar<T>, int> = 0>                    \
  constexpr bool operator op(bfloat16_t a, T b) { return float(a) op float(b); }              \
  template <class T, std::enable_if_t<emu::is_builtin_scalar<T>, int> = 0>                    \
  constexpr bool operator op(T a, bfloat16_t b) { return float(a) op float(b); }
EMU_BF16_CMP(==)
EMU_BF16_CMP(!=)
EMU_BF16_CMP(<)
EMU_BF16_CMP(<=)
EMU_BF16_CMP(>)
EMU_BF16_CMP(>=)

constexpr bfloat16_t operator-(bfloat16_t a) {
  bfloat16_t r = a;
  r.bits_ ^= 0x8000;
  return r;
}

// ------------------------------------------------------------------------------------------
// Vector types: x, y, z, w members, element-wise arithmetic, explicit conversions.

namespace emu {

template <class T, int N>
struct vec_base;
template <class T>
struct vec_base<T, 2> {
  union {
    T v[2];
    struct {
      T x, y;
    };
  };
};
template <class T>
struct vec_base<T, 3> {
  union {
    T v[4];
    struct {
      T x, y, z;
    };
  };
};
template <class T>
struct vec_base<T, 4> {
  union {
    T v[4];
    struct {
      T x, y, z, w;
    };
  };
};

template <class T, int N>
struct alignas(sizeof(T) * (N == 3 ? 4 : N)) vec : vec_base<T, N> {
  vec() = default;
  vec(T s) {
    for (int i = 0; i < N; i++) this->v[i] = s;
  }
  template <class... A, std::enable_if_t<sizeof...(A) == N, int> = 0>
  vec(A... a) {
    T values[N] = {static_cast<T>(a)...};
    for (int i = 0; i < N; i++) this->v[i] = values[i];
  }
  template <class U>
  explicit vec(vec<U, N> o) {
    for (int i = 0; i < N; i++) this->v[i] = static_cast<T>(o.v[i]);
  }
  T& operator[](int i) { return this->v[i]; }
  const T& operator[](int i) const { return this->v[i]; }
};

#define EMU_VEC_BINOP(op)                                                                     \
  template <class T, int N>                                                                   \
  vec<T, N> operator op(vec<T, N> a, vec<T, N> b) {                                 \
    vec<T, N> r;                                                                              \
    for (int i = 0; i < N; i++) r.v[i] = a.v[i] op b.v[i];                                    \
    return r;                                                                                 \
  }                                                                                           \
  template <class T, int N>                                                                   \
  vec<T, N> operator op(vec<T, N> a, T b) { return a op vec<T, N>(b); }             \
  template <class T, int N>                                                                   \
  vec<T, N> operator op(T a, vec<T, N> b) { return vec<T, N>(a) op b; }             \
  template <class T, int N, class U>                                                          \
  vec<T, N>& operator op##=(vec<T, N>& a, U b) {                                    \
    a = a op b;                                                                               \
    return a;                                                                                 \
  }
EMU_VEC_BINOP(+)
EMU_VEC_BINOP(-)
EMU_VEC_BINOP(*)
EMU_VEC_BINOP(/)
EMU_VEC_BINOP(%)
EMU_VEC_BINOP(&)
EMU_VEC_BINOP(|)
EMU_VEC_BINOP(^)

template <class T, int N>
vec<T, N> operator-(vec<T, N> a) {
  for (int i = 0; i < N; i++) a.v[i] = -a.v[i];
  return a;
}

template <class T>
struct is_vec : std::false_type {};
template <class T, int N>
struct is_vec<vec<T, N>> : std::true_type {};

template <class T>
constexpr bool is_float = std::is_floating_point<T>::value || std::is_same<T, half>::value ||
                          std::is_same<T, bfloat16_t>::value;

}  // namespace emu

#define EMU_VEC_TYPES(T, name)       \
  typedef emu::vec<T, 2> name##2;    \
  typedef emu::vec<T, 3> name##3;    \
  typedef emu::vec<T, 4> name##4;
EMU_VEC_TYPES(float, float)
EMU_VEC_TYPES(half, half)
EMU_VEC_TYPES(bfloat16_t, bfloat)
EMU_VEC_TYPES(int, int)
EMU_VEC_TYPES(uint, uint)
EMU_VEC_TYPES(short, short)
EMU_VEC_TYPES(ushort, ushort)
EMU_VEC_TYPES(char, char)
EMU_VEC_TYPES(uchar, uchar)
EMU_VEC_TYPES(long, long)
EMU_VEC_TYPES(ulong, ulong)
EMU_VEC_TYPES(bool, bool)

// ------------------------------------------------------------------------------------------
// metal:: math. Floating-point functions take float, half or bfloat and compute in float.

namespace metal {

template <class T>
EMU_INLINE T select_(T a, T b, bool c) {
  return c ? b : a;
}

#define EMU_FLOAT_T template <class T, std::enable_if_t<emu::is_float<T>, int> = 0>
#define EMU_UNARY(name, builtin) \
  EMU_FLOAT_T EMU_INLINE T name(T x) { return T(builtin(float(x))); }
EMU_UNARY(exp, __builtin_expf)
EMU_UNARY(exp2, __builtin_exp2f)
EMU_UNARY(exp10, __builtin_exp10f)
EMU_UNARY(log, __builtin_logf)
EMU_UNARY(log2, __builtin_log2f)
EMU_UNARY(log10, __builtin_log10f)
EMU_UNARY(sqrt, __builtin_sqrtf)
EMU_UNARY(sin, __builtin_sinf)
EMU_UNARY(cos, __builtin_cosf)
EMU_UNARY(tan, __builtin_tanf)
EMU_UNARY(asin, __builtin_asinf)
EMU_UNARY(acos, __builtin_acosf)
EMU_UNARY(atan, __builtin_atanf)
EMU_UNARY(sinh, __builtin_sinhf)
EMU_UNARY(cosh, __builtin_coshf)
EMU_UNARY(tanh, __builtin_tanhf)
EMU_UNARY(floor, __builtin_floorf)
EMU_UNARY(ceil, __builtin_ceilf)
EMU_UNARY(trunc, __builtin_truncf)
EMU_UNARY(round, __builtin_roundf)
EMU_UNARY(rint, __builtin_rintf)
EMU_UNARY(fabs, __builtin_fabsf)
#undef EMU_UNARY

EMU_FLOAT_T EMU_INLINE T rsqrt(T x) { return T(1.0f / __builtin_sqrtf(float(x))); }
EMU_FLOAT_T EMU_INLINE T fract(T x) { return T(float(x) - __builtin_floorf(float(x))); }
EMU_FLOAT_T EMU_INLINE T saturate(T x) { return T(__builtin_fminf(__builtin_fmaxf(float(x), 0.0f), 1.0f)); }
EMU_FLOAT_T EMU_INLINE T sign(T x) { return T(float(x) > 0.0f ? 1.0f : float(x) < 0.0f ? -1.0f : 0.0f); }
EMU_FLOAT_T EMU_INLINE T pow(T x, T y) { return T(__builtin_powf(float(x), float(y))); }
EMU_FLOAT_T EMU_INLINE T powr(T x, T y) { return T(__builtin_powf(float(x), float(y))); }
EMU_FLOAT_T EMU_INLINE T fmod(T x, T y) { return T(__builtin_fmodf(float(x), float(y))); }
EMU_FLOAT_T EMU_INLINE T atan2(T y, T x) { return T(__builtin_atan2f(float(y), float(x))); }
EMU_FLOAT_T EMU_INLINE T copysign(T x, T y) { return T(__builtin_copysignf(float(x), float(y))); }
EMU_FLOAT_T EMU_INLINE T fmax(T x, T y) { return T(__builtin_fmaxf(float(x), float(y))); }
EMU_FLOAT_T EMU_INLINE T fmin(T x, T y) { return T(__builtin_fminf(float(x), float(y))); }
EMU_FLOAT_T EMU_INLINE T fma(T a, T b, T c) { return T(__builtin_fmaf(float(a), float(b), float(c))); }
EMU_FLOAT_T EMU_INLINE T mix(T x, T y, T a) { return T(float(x) + (float(y) - float(x)) * float(a)); }
EMU_FLOAT_T EMU_INLINE T step(T edge, T x) { return T(float(x) < float(edge) ? 0.0f : 1.0f); }
EMU_FLOAT_T EMU_INLINE T divide(T x, T y) { return T(float(x) / float(y)); }
EMU_FLOAT_T EMU_INLINE bool isnan(T x) { return __builtin_isnan(float(x)); }
EMU_FLOAT_T EMU_INLINE bool isinf(T x) { return __builtin_isinf(float(x)); }
EMU_FLOAT_T EMU_INLINE bool isfinite(T x) { return __builtin_isfinite(float(x)); }
EMU_FLOAT_T EMU_INLINE bool signbit(T x) { return __builtin_signbit(float(x)); }

// max, min, abs, clamp: floats (NaN-ignoring, like fmax) and integers.
template <class T, std::enable_if_t<emu::is_builtin_scalar<T> || emu::is_float<T>, int> = 0>
EMU_INLINE T max(T x, T y) {
  if constexpr (emu::is_float<T>) {
    return T(__builtin_fmaxf(float(x), float(y)));
  } else {
    return x < y ? y : x;
  }
}
template <class T, std::enable_if_t<emu::is_builtin_scalar<T> || emu::is_float<T>, int> = 0>
EMU_INLINE T min(T x, T y) {
  if constexpr (emu::is_float<T>) {
    return T(__builtin_fminf(float(x), float(y)));
  } else {
    return y < x ? y : x;
  }
}
template <class T, std::enable_if_t<emu::is_builtin_scalar<T> || emu::is_float<T>, int> = 0>
EMU_INLINE T abs(T x) {
  if constexpr (emu::is_float<T>) {
    return T(__builtin_fabsf(float(x)));
  } else {
    return x < 0 ? T(-x) : x;
  }
}
template <class T, int N>
EMU_INLINE emu::vec<T, N> max(emu::vec<T, N> x, emu::vec<T, N> y) {
  for (int i = 0; i < N; i++) x.v[i] = max(x.v[i], y.v[i]);
  return x;
}
template <class T, int N>
EMU_INLINE emu::vec<T, N> min(emu::vec<T, N> x, emu::vec<T, N> y) {
  for (int i = 0; i < N; i++) x.v[i] = min(x.v[i], y.v[i]);
  return x;
}
template <class T>
EMU_INLINE T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
template <class T>
EMU_INLINE T select(T a, T b, bool c) {
  return c ? b : a;
}
template <class T, int N>
EMU_INLINE T dot(emu::vec<T, N> a, emu::vec<T, N> b) {
  T r = a.v[0] * b.v[0];
  for (int i = 1; i < N; i++) r += a.v[i] * b.v[i];
  return r;
}

template <class T, class U>
EMU_INLINE T as_type(U x) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of the same size");
  return __builtin_bit_cast(T, x);
}

#undef EMU_FLOAT_T

#define EMU_MATH_NAMESPACE(ns)                                                               \
  namespace ns {                                                                              \
  using metal::abs; using metal::acos; using metal::asin; using metal::atan;                 \
  using metal::atan2; using metal::ceil; using metal::cos; using metal::cosh;                \
  using metal::divide; using metal::exp; using metal::exp10; using metal::exp2;              \
  using metal::fabs; using metal::floor; using metal::fmax; using metal::fmin;               \
  using metal::fmod; using metal::fract; using metal::log; using metal::log10;               \
  using metal::log2; using metal::max; using metal::min; using metal::pow;                   \
  using metal::powr; using metal::rint; using metal::round; using metal::rsqrt;              \
  using metal::saturate; using metal::sign; using metal::sin; using metal::sinh;             \
  using metal::sqrt; using metal::tan; using metal::tanh; using metal::trunc;                \
  }
EMU_MATH_NAMESPACE(fast)
EMU_MATH_NAMESPACE(precise)
#undef EMU_MATH_NAMESPACE

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
template <>
struct numeric_limits<half> {
  static constexpr bool is_signed = true;
  static constexpr half min() { return half(6.103515625e-05f); }
  static constexpr half max() { return half(65504.0f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half epsilon() { return half(0.0009765625f); }
  static constexpr half infinity() { return half(__builtin_inff()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
};
template <>
struct numeric_limits<bfloat16_t> {
  static constexpr bool is_signed = true;
  static constexpr bfloat16_t bits(uint16_t b) {
    bfloat16_t r{};
    r.bits_ = b;
    return r;
  }
  static constexpr bfloat16_t min() { return bits(0x0080); }
  static constexpr bfloat16_t max() { return bits(0x7f7f); }
  static constexpr bfloat16_t lowest() { return bits(0xff7f); }
  static constexpr bfloat16_t epsilon() { return bits(0x3c00); }
  static constexpr bfloat16_t infinity() { return bits(0x7f80); }
  static constexpr bfloat16_t quiet_NaN() { return bits(0x7fc0); }
};

// ------------------------------------------------------------------------------------------
// Atomics. Threads switch only at barriers and SIMD-group functions, so every atomic
// operation is indivisible; atomic_begin() stops spin-waits, which would never end here.

enum memory_order { memory_order_relaxed, memory_order_seq_cst };
enum thread_scope {
  thread_scope_thread,
  thread_scope_simdgroup,
  thread_scope_threadgroup,
  thread_scope_device
};
enum mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

template <class T>
struct atomic {
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;

template <class T>
EMU_INLINE T atomic_load_explicit(const atomic<T>* a, memory_order) {
  emu::atomic_begin();
  T v = a->value;
  emu::atomic_end();
  return v;
}
template <class T, class U>
EMU_INLINE void atomic_store_explicit(atomic<T>* a, U v, memory_order) {
  emu::atomic_begin();
  a->value = T(v);
  emu::atomic_end();
}
template <class T, class U>
EMU_INLINE T atomic_exchange_explicit(atomic<T>* a, U v, memory_order) {
  emu::atomic_begin();
  T old = a->value;
  a->value = T(v);
  emu::atomic_end();
  return old;
}
#define EMU_ATOMIC_FETCH(name, expr)                                                         \
  template <class T, class U>                                                                 \
  EMU_INLINE T atomic_fetch_##name##_explicit(atomic<T>* a, U v_, memory_order) {            \
    emu::atomic_begin();                                                                      \
    T old = a->value, v = T(v_);                                                              \
    a->value = (expr);                                                                        \
    emu::atomic_end();                                                                        \
    return old;                                                                               \
  }
EMU_ATOMIC_FETCH(add, old + v)
EMU_ATOMIC_FETCH(sub, old - v)
EMU_ATOMIC_FETCH(and, old & v)
EMU_ATOMIC_FETCH(or, old | v)
EMU_ATOMIC_FETCH(xor, old ^ v)
EMU_ATOMIC_FETCH(max, old < v ? v : old)
EMU_ATOMIC_FETCH(min, v < old ? v : old)
#undef EMU_ATOMIC_FETCH
template <class T, class U>
EMU_INLINE bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected, U desired,
                                                      memory_order, memory_order) {
  emu::atomic_begin();
  bool swapped = a->value == *expected;
  if (swapped) {
    a->value = T(desired);
  } else {
    *expected = a->value;
  }
  emu::atomic_end();
  return swapped;
}

// Fences are no-ops: every access is sequentially consistent here. atomic_thread_fence is
// MSL 3.2 (macOS 15); MLX compiles custom kernels as MSL 3.1 on macOS 14 (EMU_MSL = 310).
#if EMU_MSL >= 320
EMU_INLINE void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope_device) {}
#else
template <class... A>
void atomic_thread_fence(A...) {
  static_assert(sizeof...(A) > 99, "atomic_thread_fence is MSL 3.2 (macOS 15): not in MSL 3.1");
}
#endif

}  // namespace metal

// ------------------------------------------------------------------------------------------
// SIMD groups of 32 lanes and threadgroup barriers. A collective suspends the calling thread;
// the scheduler resolves it once every lane of the SIMD group has stopped, over the lanes
// waiting at it (the active lanes: the others have returned or wait at a barrier).

namespace emu {

template <class T, Collective F>
T collective(T x, uint32_t arg, Site site) {
  Lane* l = lane();
  T result;
  l->in = &x;
  l->out = &result;
  l->arg = arg;
  l->collective = F;
  l->site = site;
  simd_wait();
  return result;
}

template <class T>
EMU_INLINE const T& in(Lane* l) {
  return *static_cast<const T*>(l->in);
}
template <class T>
EMU_INLINE T& out(Lane* l) {
  return *static_cast<T*>(l->out);
}

// Reductions run the butterfly (xor 1, 2, 4, 8, 16) that Apple GPUs use, so every lane gets
// the same value; inactive lanes contribute the identity.
template <class T, class Op>
const char* reduce(Lane* const* lanes, uint32_t waiting) {
  T v[32], next[32];
  for (int i = 0; i < 32; i++) v[i] = (waiting >> i & 1) ? in<T>(lanes[i]) : Op::template identity<T>();
  for (int m = 1; m < 32; m <<= 1) {
    for (int i = 0; i < 32; i++) next[i] = Op::apply(v[i], v[i ^ m]);
    for (int i = 0; i < 32; i++) v[i] = next[i];
  }
  for (int i = 0; i < 32; i++)
    if (waiting >> i & 1) out<T>(lanes[i]) = v[i];
  return nullptr;
}

template <class T, class Op, bool Inclusive>
const char* prefix(Lane* const* lanes, uint32_t waiting) {
  T acc = Op::template identity<T>();
  for (int i = 0; i < 32; i++) {
    if (!(waiting >> i & 1)) continue;
    T x = in<T>(lanes[i]);
    if (Inclusive) acc = Op::apply(acc, x);
    out<T>(lanes[i]) = acc;
    if (!Inclusive) acc = Op::apply(acc, x);
  }
  return nullptr;
}

enum ShuffleKind { kIndex, kXor, kDown, kUp, kRotateDown, kRotateUp, kFirst };

// A lane reads lane `src`; reading a lane outside the SIMD group keeps the own value for
// shuffle_down/up (as Metal specifies), and reading an inactive lane is an error.
template <class T, ShuffleKind K>
const char* shuffle(Lane* const* lanes, uint32_t waiting) {
  T v[32];
  int first = __builtin_ctz(waiting);
  for (int i = 0; i < 32; i++)
    if (waiting >> i & 1) v[i] = in<T>(lanes[i]);
  for (int i = 0; i < 32; i++) {
    if (!(waiting >> i & 1)) continue;
    int a = int(lanes[i]->arg), src;
    switch (K) {
      case kIndex: src = a; break;
      case kXor: src = i ^ a; break;
      case kDown: src = i + a < 32 ? i + a : i; break;
      case kUp: src = i - a >= 0 ? i - a : i; break;
      case kRotateDown: src = (i + a) % 32; break;
      case kRotateUp: src = ((i - a) % 32 + 32) % 32; break;
      case kFirst: src = first; break;
    }
    if (src < 0 || src >= 32 || !(waiting >> src & 1)) {
      return "a SIMD shuffle or broadcast reads a lane that is inactive or does not exist";
    }
    out<T>(lanes[i]) = v[src];
  }
  return nullptr;
}

struct Sum {
  template <class T> static T identity() { return T(0); }
  template <class T> static T apply(T a, T b) { return a + b; }
};
struct Product {
  template <class T> static T identity() { return T(1); }
  template <class T> static T apply(T a, T b) { return a * b; }
};
struct Max {
  template <class T> static T identity() { return metal::numeric_limits<T>::lowest(); }
  template <class T> static T apply(T a, T b) { return metal::max(a, b); }
};
struct Min {
  template <class T> static T identity() { return metal::numeric_limits<T>::max(); }
  template <class T> static T apply(T a, T b) { return metal::min(a, b); }
};
struct And {
  template <class T> static T identity() { return T(~T(0)); }
  template <class T> static T apply(T a, T b) { return a & b; }
};
struct Or {
  template <class T> static T identity() { return T(0); }
  template <class T> static T apply(T a, T b) { return a | b; }
};
struct Xor {
  template <class T> static T identity() { return T(0); }
  template <class T> static T apply(T a, T b) { return a ^ b; }
};

inline const char* sync(Lane* const*, uint32_t) { return nullptr; }

inline uint32_t linear(const uint32_t* p, const uint32_t* size) {
  return p[0] + size[0] * (p[1] + size[1] * p[2]);
}

}  // namespace emu

namespace metal {

#define EMU_REDUCE(name, Op) \
  template <class T> EMU_INLINE T name(T x, EMU_HERE) { return emu::collective<T, emu::reduce<T, emu::Op>>(x, 0, EMU_SITE); }
EMU_REDUCE(simd_sum, Sum)
EMU_REDUCE(simd_product, Product)
EMU_REDUCE(simd_max, Max)
EMU_REDUCE(simd_min, Min)
EMU_REDUCE(simd_and, And)
EMU_REDUCE(simd_or, Or)
EMU_REDUCE(simd_xor, Xor)
#undef EMU_REDUCE

#define EMU_PREFIX(name, Op, inclusive) \
  template <class T> EMU_INLINE T name(T x, EMU_HERE) { return emu::collective<T, emu::prefix<T, emu::Op, inclusive>>(x, 0, EMU_SITE); }
EMU_PREFIX(simd_prefix_exclusive_sum, Sum, false)
EMU_PREFIX(simd_prefix_inclusive_sum, Sum, true)
EMU_PREFIX(simd_prefix_exclusive_product, Product, false)
EMU_PREFIX(simd_prefix_inclusive_product, Product, true)
#undef EMU_PREFIX

#define EMU_SHUFFLE(name, kind) \
  template <class T> EMU_INLINE T name(T x, ushort a, EMU_HERE) { return emu::collective<T, emu::shuffle<T, emu::kind>>(x, a, EMU_SITE); }
EMU_SHUFFLE(simd_shuffle, kIndex)
EMU_SHUFFLE(simd_broadcast, kIndex)
EMU_SHUFFLE(simd_shuffle_xor, kXor)
EMU_SHUFFLE(simd_shuffle_down, kDown)
EMU_SHUFFLE(simd_shuffle_up, kUp)
EMU_SHUFFLE(simd_shuffle_rotate_down, kRotateDown)
EMU_SHUFFLE(simd_shuffle_rotate_up, kRotateUp)
#undef EMU_SHUFFLE

template <class T>
EMU_INLINE T simd_broadcast_first(T x, EMU_HERE) {
  return emu::collective<T, emu::shuffle<T, emu::kFirst>>(x, 0, EMU_SITE);
}
EMU_INLINE bool simd_any(bool x, EMU_HERE) {
  return emu::collective<uint, emu::reduce<uint, emu::Or>>(x, 0, EMU_SITE);
}
EMU_INLINE bool simd_all(bool x, EMU_HERE) {
  return emu::collective<uint, emu::reduce<uint, emu::And>>(x, 0, EMU_SITE) & 1;
}
EMU_INLINE bool simd_is_first(EMU_HERE) {
  uint index = emu::lane()->index;
  return emu::collective<uint, emu::shuffle<uint, emu::kFirst>>(index, 0, EMU_SITE) == index;
}
EMU_INLINE void simdgroup_barrier(mem_flags, EMU_HERE) { emu::collective<int, emu::sync>(0, 0, EMU_SITE); }
EMU_INLINE void threadgroup_barrier(mem_flags, EMU_HERE) { emu::barrier(EMU_SITE); }

}  // namespace metal

using namespace metal;

// ------------------------------------------------------------------------------------------
// Thread-position attributes, as functions of the running thread. In a threadgroup at the
// edge of a grid that is not a multiple of the threadgroup size, threads_per_threadgroup is
// the threads that exist and dispatch_threads_per_threadgroup the size given at dispatch.

namespace emu {

EMU_INLINE uint3 as_uint3(const uint32_t* p) { return uint3(p[0], p[1], p[2]); }
EMU_INLINE uint tg_threads(const uint32_t* size) { return size[0] * size[1] * size[2]; }

EMU_INLINE uint3 thread_position_in_threadgroup() { return as_uint3(lane()->pos); }
EMU_INLINE uint thread_index_in_threadgroup() { return lane()->index; }
EMU_INLINE uint3 threadgroup_position_in_grid() { return as_uint3(grid()->origin); }
EMU_INLINE uint3 threads_per_threadgroup() { return as_uint3(grid()->size); }
EMU_INLINE uint3 dispatch_threads_per_threadgroup() { return as_uint3(grid()->group); }
EMU_INLINE uint3 threadgroups_per_grid() { return as_uint3(grid()->groups); }
EMU_INLINE uint3 threads_per_grid() { return as_uint3(grid()->grid); }
EMU_INLINE uint3 grid_size() { return as_uint3(grid()->grid); }
EMU_INLINE uint3 grid_origin() { return uint3(0u); }
EMU_INLINE uint3 thread_position_in_grid() {
  const Grid* g = grid();
  const uint32_t* p = lane()->pos;
  return uint3(g->origin[0] * g->group[0] + p[0], g->origin[1] * g->group[1] + p[1],
               g->origin[2] * g->group[2] + p[2]);
}
EMU_INLINE uint thread_index_in_simdgroup() { return lane()->index % 32; }
EMU_INLINE uint simdgroup_index_in_threadgroup() { return lane()->index / 32; }
EMU_INLINE uint threads_per_simdgroup() { return 32; }
EMU_INLINE uint thread_execution_width() { return 32; }
EMU_INLINE uint simdgroups_per_threadgroup() { return (tg_threads(grid()->size) + 31) / 32; }
EMU_INLINE uint dispatch_simdgroups_per_threadgroup() { return (tg_threads(grid()->group) + 31) / 32; }
EMU_INLINE uint thread_index_in_quadgroup() { return lane()->index % 4; }
EMU_INLINE uint quadgroup_index_in_threadgroup() { return lane()->index / 4; }
EMU_INLINE uint quadgroups_per_threadgroup() { return (tg_threads(grid()->size) + 3) / 4; }
EMU_INLINE uint dispatch_quadgroups_per_threadgroup() { return (tg_threads(grid()->group) + 3) / 4; }

}  // namespace emu

// ------------------------------------------------------------------------------------------
// The part of MLX's kernel utilities (metal::utils(), prepended to every custom kernel) that
// the emulator provides.

template <typename U>
struct Limits {
  static constexpr U max = metal::numeric_limits<U>::max();
  static constexpr U min = metal::numeric_limits<U>::min();
  static constexpr U finite_max = metal::numeric_limits<U>::max();
  static constexpr U finite_min = metal::numeric_limits<U>::min();
};
#define EMU_FLOAT_LIMITS(T)                                                  \
  template <>                                                                \
  struct Limits<T> {                                                         \
    static constexpr T max = metal::numeric_limits<T>::infinity();           \
    static constexpr T min = -metal::numeric_limits<T>::infinity();          \
    static constexpr T finite_max = metal::numeric_limits<T>::max();         \
    static constexpr T finite_min = metal::numeric_limits<T>::lowest();      \
  };
EMU_FLOAT_LIMITS(float)
EMU_FLOAT_LIMITS(half)
EMU_FLOAT_LIMITS(bfloat16_t)
#undef EMU_FLOAT_LIMITS

template <typename T>
constexpr T ceildiv(T n, T d) {
  return (n + d - 1) / d;
}

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

#endif  // EMU_RUNTIME
