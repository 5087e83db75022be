// FlashHead stage 1: score every cluster, keep the n_probes best (wrapper:
// flashhead_mlx/kernels/centroid_topk.py). Two dispatches, nothing shared between threadgroups
// within one: MLX orders the second after the first.
//
// score[b, c] = sum_g scale[c, g] * (h[b, g] . q[c, g]) + bias[c, g] * sum(h[b, g]) + cluster_bias[c],
// in float32, for centroids in MLX's affine format (BITS = 2, 4 or 8, groups of GS = 32, 64
// or 128) or float rows (BITS = 0). Output: the ids of the n_probes best clusters of each row,
// ascending, and their scores; ties go to the lowest cluster id (the pair (score, id) decides,
// see order_key).
//
// centroid_topk_score: threadgroups of 4 SIMD groups, each scoring ROWS = 4 consecutive
//   clusters for one row of h (grid: ceil(C / 16) x B threadgroups): per step each lane loads
//   16 values of h (and their sum) once and 8 bytes of each of the 4 centroids (4-bit; 16 at
//   8-bit, 16 bytes of float rows), as MLX's qmv does; one simd_sum of a float4 at the end.
//   Writes each score as its order key to keys[b, c] (its own element: no atomics).
// centroid_topk_select: one threadgroup per row of h, T threads (T = min(512, C / 16 rounded
//   up to 32)), thread t holding keys t * KPT ... t * KPT + KPT - 1 in registers. The key of
//   the n_probes-th best is found 4 bits at a time from the top (8 passes): each thread counts
//   its keys per digit in 8-bit fields of 4 registers, the SIMD groups add the counts with 8
//   simd_sums (two 16-bit counts per uint), 16 threads add the SIMD groups' counts, and every
//   thread picks the digit. No atomics and no shared bins: nothing contends. Then each thread
//   takes its keys above that key and the lowest ids equal to it (prefix sums over the
//   threads give each its place in the ascending output).
//
// Bytes and time (UNMEASURED estimates, tabled in metal/README.md with the old kernel's):
// score reads C * d * (BITS / 8 + 4 / GS) + 2 C bytes per row of h and writes 4 C; select reads
// those 4 C bytes back (from cache) and writes 8 n_probes.

template <uint KPT>
inline void select_top(
    const device uint32_t* row_keys,
    uint C,
    uint P,
    device uint32_t* ids,
    device float* scores,
    threadgroup uint* counts,
    threadgroup uint* totals,
    threadgroup uint* buf,
    uint tid,
    uint lane,
    uint sg,
    uint n_sg) {
  const uint first = tid * KPT;
  uint key[KPT];
  for (uint i = 0; i < KPT; i++) {
    key[i] = first + i < C ? row_keys[first + i] : 0u;
  }
  uint prefix = 0, need = P;
  for (int shift = 28; shift >= 0; shift -= 4) {
    const uint mask = shift == 28 ? 0u : 0xffffffffu << (shift + 4);
    uint bins[4] = {0u, 0u, 0u, 0u};  // the count of digit d in byte d % 4 of bins[d / 4]
    for (uint i = 0; i < KPT; i++) {
      if (first + i < C && (key[i] & mask) == prefix) {
        uint digit = (key[i] >> shift) & 15u;
        uint one = 1u << (8 * (digit & 3u));
        for (uint w = 0; w < 4; w++) {
          bins[w] += digit / 4 == w ? one : 0u;
        }
      }
    }
    for (uint j = 0; j < 8; j++) {  // digits 2j and 2j + 1 as the two halves of one uint
      uint pair = bins[j / 2] >> (16 * (j % 2));
      pair = simd_sum((pair & 0xffu) | ((pair & 0xff00u) << 8));
      if (lane == 0) {
        counts[sg * 8 + j] = pair;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid < 16) {
      uint total = 0;
      for (uint s = 0; s < n_sg; s++) {
        total += (counts[s * 8 + tid / 2] >> (16 * (tid % 2))) & 0xffffu;
      }
      totals[tid] = total;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // The highest digit whose keys, with those of the digits above it, reach `need`.
    uint above = 0, digit = 0;
    bool found = false;
    for (int d = 15; d >= 0; d--) {
      uint count = totals[d];
      if (!found && above + count >= need) {
        digit = uint(d);
        found = true;
      } else if (!found) {
        above += count;
      }
    }
    prefix |= digit << shift;
    need -= above;
  }
  // prefix is now the key of the P-th best: take every key above it and the `need` lowest ids
  // equal to it.
  uint above = 0, equal = 0;
  for (uint i = 0; i < KPT; i++) {
    bool valid = first + i < C;
    above += valid && key[i] > prefix;
    equal += valid && key[i] == prefix;
  }
  uint above_before = threadgroup_exclusive_sum(above, buf, lane, sg, n_sg);
  uint equal_before = threadgroup_exclusive_sum(equal, buf, lane, sg, n_sg);
  for (uint i = 0; i < KPT; i++) {
    if (first + i >= C) {
      break;
    }
    if (key[i] > prefix || (key[i] == prefix && equal_before < need)) {
      uint at = above_before + min(equal_before, need);
      ids[at] = first + i;
      scores[at] = key_score(key[i]);
    }
    above_before += key[i] > prefix;
    equal_before += key[i] == prefix;
  }
}

// ---- kernel centroid_topk_score ----
  const uint D = h_shape[1], C = w_shape[0];
  const uint b = threadgroup_position_in_grid.y;
  const uint lane = thread_index_in_simdgroup;
  const uint simdgroup =
      threadgroup_position_in_grid.x * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup;
  const uint first = simdgroup * ROWS;
  if (first >= C) {
    return;
  }
  float4 score = rows_dot<BITS, GS>(h + size_t(b) * D, w, scales, biases, first, C - 1, D, lane);
  if (lane < ROWS && first + lane < C) {
    uint c = first + lane;
    keys[size_t(b) * C + c] = order_key(score[lane] + static_cast<float>(cluster_bias[c]));
  }

// ---- kernel centroid_topk_select ----
  const uint C = keys_shape[1], P = n_probes;
  const uint b = threadgroup_position_in_grid.y;
  threadgroup uint counts[MAX_SIMDGROUPS * 8];
  threadgroup uint totals[16];
  threadgroup uint buf[MAX_SIMDGROUPS];
  select_top<KPT>(keys + size_t(b) * C, C, P, ids + size_t(b) * P, scores + size_t(b) * P,
                  counts, totals, buf, thread_index_in_threadgroup, thread_index_in_simdgroup,
                  simdgroup_index_in_threadgroup, simdgroups_per_threadgroup);
