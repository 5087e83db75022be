// Helpers that the FlashHead kernels share (passed to mx.fast.metal_kernel as `header`).
// Nothing here needs more than MSL 3.1 (MLX on macOS 14): no atomics, no fences.

// A float's bits as a uint that sorts like the float (-0 just below +0): a score and its
// cluster or token id then compare as one pair, ties going to the lowest id.
inline uint order_key(float x) {
  uint bits = as_type<uint>(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline float key_score(uint key) {
  return as_type<float>((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

inline bool better(uint key, uint id, uint best_key, uint best_id) {
  return key > best_key || (key == best_key && id < best_id);
}

// Rows scored at once by one SIMD group (both stages): the lanes share each load of h.
static constant constexpr const uint ROWS = 4;

// Values of h one lane takes per step of a row: 16 packed values (BITS = 2, 4 or 8: one 4-,
// 8- or 16-byte load of weights), or 16 bytes of float weights (4 float32, 8 float16/bfloat16).
template <int BITS, typename T>
constexpr uint lane_values() {
  return BITS ? 16 : 16 / sizeof(T);
}

// h[j .. j + N) as float into xs, and their sum (for the affine bias). For packed rows, value k
// is pre-divided by 2^(BITS * (k % (32 / BITS))), its position in its uint32 word, so that a
// masked word needs no shift: xs[k] * float(word & (M << s)) == h[j + k] * q exactly.
template <int BITS, uint N, typename X>
inline float load_h(X x, uint j, thread float* xs) {
  float sum = 0.0f;
  for (uint k = 0; k < N; k++) {
    float v = static_cast<float>(x[j + k]);
    sum += v;
    if constexpr (BITS > 0) {
      xs[k] = v / static_cast<float>(1u << (BITS * (k % (32 / BITS))));
    } else {
      xs[k] = v;
    }
  }
  return sum;
}

// One lane's step of a float row: 16 bytes of weights at value j, against xs.
template <uint N, typename T>
inline float float_step(const device T* w, size_t row, uint D, uint j, const thread float* xs) {
  uint4 raw = *(const device uint4*)(w + row * D + j);
  float dot = 0.0f;
  for (uint k = 0; k < N; k++) {
    if constexpr (sizeof(T) == 4) {
      dot += xs[k] * as_type<float>(raw[k]);
    } else {
      dot += xs[k] * static_cast<float>(as_type<T>(ushort(raw[k / 2] >> (16 * (k % 2)))));
    }
  }
  return dot;
}

// One lane's step of a packed row (MLX's affine format: value = scale * q + bias per group of
// GS values; the lane's 16 values lie in one group): its words in one load, then
// scale * (xs . q) + bias * sum(h).
template <int BITS, int GS, typename S>
inline float packed_step(
    const device uint32_t* w,
    S scales,
    S biases,
    size_t row,
    uint D,
    uint j,
    const thread float* xs,
    float xsum) {
  constexpr uint PER = 32 / BITS, WORDS = 16 / PER, M = (1u << BITS) - 1;
  const device uint32_t* p = w + row * (D / PER) + j / PER;
  uint q[WORDS];
  if constexpr (WORDS == 4) {
    uint4 v = *(const device uint4*)p;
    q[0] = v.x, q[1] = v.y, q[2] = v.z, q[3] = v.w;
  } else if constexpr (WORDS == 2) {
    uint2 v = *(const device uint2*)p;
    q[0] = v.x, q[1] = v.y;
  } else {
    q[0] = p[0];
  }
  float dot = 0.0f;
  for (uint k = 0; k < 16; k++) {
    dot += xs[k] * static_cast<float>(q[k / PER] & (M << (BITS * (k % PER))));
  }
  size_t g = row * (D / GS) + j / GS;
  return static_cast<float>(scales[g]) * dot + static_cast<float>(biases[g]) * xsum;
}

// h . row for the ROWS rows first, first + 1, ... of a head (rows past `last` read row `last`
// instead, and their result is meant to be dropped), in float32, in every lane of the SIMD
// group. Like MLX's qmv: the lanes stride over d, each loads its slice of h (and its sum) once
// per step for all ROWS rows, and reads 8-16 bytes of each row per step; one simd_sum at the
// end. D must be a multiple of lane_values().
template <int BITS, int GS, typename X, typename T, typename S>
inline float4 rows_dot(
    X x, const device T* w, S scales, S biases, size_t first, size_t last, uint D, uint lane) {
  constexpr uint N = lane_values<BITS, T>();
  float acc[ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (uint j = lane * N; j < D; j += 32 * N) {
    float xs[N];
    float xsum = load_h<BITS, N>(x, j, xs);
    for (uint r = 0; r < ROWS; r++) {
      size_t row = first + r < last ? first + r : last;
      if constexpr (BITS > 0) {
        acc[r] += packed_step<BITS, GS>(w, scales, biases, row, D, j, xs, xsum);
      } else {
        acc[r] += float_step<N>(w, row, D, j, xs);
      }
    }
  }
  return simd_sum(float4(acc[0], acc[1], acc[2], acc[3]));
}

// Threadgroup arrays are sized for at most this many SIMD groups (512 threads).
static constant constexpr const uint MAX_SIMDGROUPS = 16;

// Exclusive prefix sum of v over the threads of a threadgroup of n_sg SIMD groups, in thread
// order. buf holds n_sg values.
inline uint threadgroup_exclusive_sum(
    uint v, threadgroup uint* buf, uint lane, uint sg, uint n_sg) {
  uint inclusive = simd_prefix_inclusive_sum(v);
  if (lane == 31) {
    buf[sg] = inclusive;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  uint before = 0;
  for (uint i = 0; i < sg; i++) {
    before += buf[i];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return before + inclusive - v;
}

// The best (key, id) pair over the lanes of a SIMD group, in every lane.
inline void simd_best(thread uint& key, thread uint& id) {
  uint best_key = simd_max(key);
  id = simd_min(key == best_key ? id : 0xffffffffu);
  key = best_key;
}
