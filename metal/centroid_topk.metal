// FlashHead stage 1: score every cluster, keep the n_probes best (wrapper:
// flashhead_mlx/kernels/centroid_topk.py).
//
// score[b, c] = sum_g scale[c, g] * (h[b, g] . q[c, g]) + bias[c, g] * sum(h[b, g]) + cluster_bias[c],
// in float32, for centroids in MLX's affine format (BITS = 2, 4 or 8, groups of GS = 32, 64
// or 128). Output: the ids of the n_probes best clusters of each row, ascending, and their
// scores; ties go to the lowest cluster id (the pair (score, id) decides, see order_key).
//
// Design (on paper until someone runs it on a Mac):
// - Work split: threadgroups of 256 threads (8 SIMD groups); each SIMD group scores 4
//   clusters for every row of h, its 32 lanes striding over the packed uint32 words of a
//   centroid row (a row of d * BITS / 8 bytes is read as consecutive 128-byte chunks), then
//   simd_sum. ceil(C / 32) threadgroups, so every GPU core streams centroids.
// - Scores go to a scratch region as order keys (atomic stores). The last threadgroup to
//   finish (an atomic ticket, fences of MSL 3.2) selects per row without sorting: a 4-pass
//   MSB-first radix select (256-bin threadgroup histogram, prefix sums over the bins with
//   simd_prefix_inclusive_sum) finds the key of the n_probes-th best, then a pass in id order
//   writes the keys above it and the lowest ids equal to it.
// - One output buffer (ids | score bits | keys | ticket), zeroed by init_value, so the call is
//   one fill and one dispatch.
// - Bytes read per call: C * d * (BITS / 8 + 4 / GS) (packed words, bfloat16 scales and
//   biases) + 2 C (cluster bias) + B * d * 2, plus 5 passes over B * C keys (4 bytes) in the
//   merge, from cache. 4-bit, GS = 64, cluster_size 16:
//     Llama-3.2-1B (C = 8016, d = 2048):  9.25 MB -> M1 136 us, M4 77 us, M4 Max 17 us
//     Qwen3-0.6B   (C = 9496, d = 1024):  5.49 MB -> M1  81 us, M4 46 us, M4 Max 10 us
//     Gemma-3-270M (C = 16384, d = 640):  5.93 MB -> M1  87 us, M4 49 us, M4 Max 11 us
//   at full bandwidth (68, 120, 546 GB/s), plus the single-threadgroup merge (5 * C / 256
//   cached loads and histogram atomics per thread, guessed at 3-10 us: it dominates on M4 Max)
//   and the zero fill. h is re-read from cache for every cluster; keeping each lane's slice
//   of h in registers (B = 1) is the next step if the cache traffic shows.
// - Needs MSL 3.2 (macOS 15) for atomic_thread_fence with thread_scope_device.

template <uint TG>
inline void select_top(
    const device atomic_uint* keys,
    uint C,
    uint P,
    device uint* ids,
    device uint* scores,
    threadgroup atomic_uint* hist,
    threadgroup uint* buf,
    uint tid,
    uint lane,
    uint sg) {
  constexpr uint NSG = TG / 32;
  uint prefix = 0, mask = 0, need = P;
  for (int shift = 24; shift >= 0; shift -= 8) {
    atomic_store_explicit(hist + tid, 0u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint c = tid; c < C; c += TG) {
      uint key = atomic_load_explicit(keys + c, memory_order_relaxed);
      if ((key & mask) == prefix) {
        atomic_fetch_add_explicit(hist + ((key >> shift) & 255u), 1u, memory_order_relaxed);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // Thread t holds bin 255 - t, so the prefix sum counts the keys in higher bins.
    uint count = atomic_load_explicit(hist + 255 - tid, memory_order_relaxed);
    uint above = threadgroup_exclusive_sum<TG>(count, buf, lane, sg);
    if (above < need && need <= above + count) {
      buf[NSG] = 255 - tid;
      buf[NSG + 1] = need - above;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    prefix |= buf[NSG] << shift;
    mask |= 255u << shift;
    need = buf[NSG + 1];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  // prefix is now the key of the P-th best: take every key above it and the `need` lowest
  // ids equal to it, each thread a contiguous run of ids.
  uint per = (C + TG - 1) / TG;
  uint begin = min(tid * per, C), end = min(begin + per, C);
  uint above = 0, equal = 0;
  for (uint c = begin; c < end; c++) {
    uint key = atomic_load_explicit(keys + c, memory_order_relaxed);
    above += key > prefix;
    equal += key == prefix;
  }
  uint above_before = threadgroup_exclusive_sum<TG>(above, buf, lane, sg);
  uint equal_before = threadgroup_exclusive_sum<TG>(equal, buf, lane, sg);
  for (uint c = begin; c < end; c++) {
    uint key = atomic_load_explicit(keys + c, memory_order_relaxed);
    if (key > prefix || (key == prefix && equal_before < need)) {
      uint at = above_before + min(equal_before, need);
      ids[at] = c;
      scores[at] = as_type<uint>(key_score(key));
    }
    above_before += key > prefix;
    equal_before += key == prefix;
  }
}

// ---- kernel body ----
  constexpr uint TG = 256, NSG = TG / 32, R = 4;
  const uint B = h_shape[0], D = h_shape[1], C = w_shape[0], P = n_probes;
  const uint tid = thread_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup, sg = simdgroup_index_in_threadgroup;
  device uint* ids = out;
  device uint* scores = out + B * P;
  device atomic_uint* keys = (device atomic_uint*)(out + 2 * B * P);
  device atomic_uint* ticket = (device atomic_uint*)(out + 2 * B * P + B * C);

  for (uint r = 0; r < R; r++) {
    uint c = (threadgroup_position_in_grid.x * NSG + sg) * R + r;
    if (c >= C) {
      break;
    }
    for (uint b = 0; b < B; b++) {
      float acc = lane_dot<BITS, GS>(h + size_t(b) * D, w, scales, biases, c, D, lane);
      float score = simd_sum(acc) + static_cast<float>(cluster_bias[c]);
      if (lane == 0) {
        atomic_store_explicit(keys + size_t(b) * C + c, order_key(score), memory_order_relaxed);
      }
    }
  }

  threadgroup uint flag[1];
  if (!last_threadgroup(ticket, threadgroups_per_grid.x, flag, tid)) {
    return;
  }
  threadgroup atomic_uint hist[TG];
  threadgroup uint buf[NSG + 2];
  for (uint b = 0; b < B; b++) {
    select_top<TG>(keys + size_t(b) * C, C, P, ids + b * P, scores + b * P, hist, buf, tid, lane, sg);
  }
