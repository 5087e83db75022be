// Helpers that the FlashHead kernels share (passed to mx.fast.metal_kernel as `header`).

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

// One lane's part of the dot product of x with row `row` of a head: the lanes of a SIMD group
// stride over the row, 4 values (BITS == 0: float rows) or one packed uint32 (BITS = 2, 4 or
// 8: MLX's affine format, value = scale * q + bias per group of GS values) at a time. The
// pointer types are template parameters so that any address space works (MLX passes arrays
// of fewer than 8 elements as constant).
template <int BITS, int GS, typename X, typename Wt, typename St, typename Bt>
inline float lane_dot(X x, Wt w, St scales, Bt biases, size_t row, uint D, uint lane) {
  float acc = 0.0f;
  if constexpr (BITS == 0) {
    auto wr = w + row * D;
    for (uint j = 4 * lane; j < D; j += 128) {
      for (uint q = 0; q < 4; q++) {
        acc += static_cast<float>(wr[j + q]) * static_cast<float>(x[j + q]);
      }
    }
  } else {
    constexpr uint V = 32 / BITS;
    constexpr uint M = (1u << BITS) - 1;
    const uint words = D / V;
    auto wr = w + row * words;
    auto sr = scales + row * (D / GS);
    auto br = biases + row * (D / GS);
    for (uint i = lane; i < words; i += 32) {
      uint packed = wr[i];
      float xq = 0.0f, xs = 0.0f;
      for (uint v = 0; v < V; v++) {
        float xv = static_cast<float>(x[i * V + v]);
        xq += xv * static_cast<float>((packed >> (BITS * v)) & M);
        xs += xv;
      }
      uint g = i * V / GS;
      acc += static_cast<float>(sr[g]) * xq + static_cast<float>(br[g]) * xs;
    }
  }
  return acc;
}

// Exclusive prefix sum of v over the threads of a threadgroup of TG threads (a multiple of
// 32), in thread order. buf holds TG / 32 values.
template <uint TG>
inline uint threadgroup_exclusive_sum(uint v, threadgroup uint* buf, uint lane, uint sg) {
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

// The best (key, id) pair over the threads of a threadgroup, valid in thread 0. buf holds
// 2 * TG / 32 values.
template <uint TG>
inline void threadgroup_best(
    thread uint& key, thread uint& id, threadgroup uint* buf, uint lane, uint sg, uint tid) {
  uint best_key = simd_max(key);
  uint best_id = simd_min(key == best_key ? id : 0xffffffffu);
  if (lane == 0) {
    buf[2 * sg] = best_key;
    buf[2 * sg + 1] = best_id;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    key = buf[0];
    id = buf[1];
    for (uint i = 1; i < TG / 32; i++) {
      if (better(buf[2 * i], buf[2 * i + 1], key, id)) {
        key = buf[2 * i];
        id = buf[2 * i + 1];
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// True in the threadgroup that finishes last among n_groups sharing `ticket` (zeroed before
// the launch), once the device writes of all of them are visible to it. Threadgroups exchange
// their results through atomics, and the fences order them (MSL 3.2).
inline bool last_threadgroup(
    device atomic_uint* ticket, uint n_groups, threadgroup uint* flag, uint tid) {
  atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
  threadgroup_barrier(mem_flags::mem_device);
  if (tid == 0) {
    flag[0] = atomic_fetch_add_explicit(ticket, 1u, memory_order_relaxed) == n_groups - 1;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  bool last = flag[0];
  if (last) {
    atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
  }
  return last;
}
