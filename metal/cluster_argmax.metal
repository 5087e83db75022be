// FlashHead stage 2: score the rows of the probed clusters exactly and reduce them to the
// greedy token (wrapper: flashhead_mlx/kernels/cluster_argmax.py). Two dispatches, nothing
// shared between threadgroups within one.
//
// For row b and probe p (cluster k = probes[b, p]), slot k * cluster_size + r of the head (rows
// in cluster order, float rows when BITS == 0, else MLX's affine format with groups of GS)
// has the logit h[b] . row, in float32, then softcap * tanh(logit / softcap) when softcap > 0,
// and -inf when it is a padding slot (order[slot] < 0). Outputs: those logits
// [B, n_probes * cluster_size] (for sampling) and the token with the highest logit per row,
// ties to the lowest token id (padding never wins).
//
// cluster_argmax_score: threadgroups of 4 SIMD groups, each scoring ROWS = 4 consecutive slots
//   of one probed cluster (cluster_size is a multiple of 4: 16 or 32 rows are 4 or 8 SIMD
//   groups, one or two threadgroups; grid: ceil(n_probes * cluster_size / 16) x B
//   threadgroups). The clusters' rows are contiguous (cluster order), so a SIMD group reads 4
//   runs of d * bytes_per_weight bytes, 8-16 bytes per lane per step as in MLX's qmv, h's slice
//   loaded once per step for the 4 rows. Lane r writes logit r; lane 0 writes the SIMD group's
//   best (order_key(logit), token) pair to its own slot of `partials` ((0, ~0) when it has
//   none): no atomics, no zeroed memory.
// cluster_argmax_reduce: one threadgroup per row of h reduces that row's pairs to the token
//   (a strided pass, simd_max / simd_min, then the SIMD groups' bests). MLX runs it only when
//   the token is used: a sampling step, which reads the logits only, never dispatches it.
//
// Bytes and time (UNMEASURED estimates, tabled in metal/README.md with the old kernel's):
// score reads n_probes * cluster_size * (d * bytes_per_weight + 4) bytes per row of h (rows and
// order; packed rows d * (BITS / 8 + 4 / GS) with bfloat16 scales and biases) and writes
// 4 bytes per logit and 8 per SIMD group; reduce reads those 8-byte pairs.

// ---- kernel cluster_argmax_score ----
  const uint P = probes_shape[1], D = h_shape[1], S_ = cluster_size;
  const uint b = threadgroup_position_in_grid.y;
  const uint lane = thread_index_in_simdgroup;
  const uint n = P * S_;  // logits per row of h
  const uint slot_in_row =
      threadgroup_position_in_grid.x * simdgroups_per_threadgroup + simdgroup_index_in_threadgroup;
  const uint first = slot_in_row * ROWS;  // the SIMD group's first logit in the row
  uint best_key = 0, best_token = 0xffffffffu;
  if (first < n) {
    size_t slot = size_t(probes[size_t(b) * P + first / S_]) * S_ + first % S_;
    float4 logit = rows_dot<BITS, GS>(h + size_t(b) * D, w, scales, biases, slot,
                                      slot + ROWS - 1, D, lane);
    for (uint r = 0; r < ROWS; r++) {
      float value = logit[r];
      if (softcap > 0.0f) {
        value = metal::precise::tanh(value / softcap) * softcap;
      }
      int token = order[slot + r];
      if (token < 0) {
        value = -INFINITY;
      }
      if (lane == r) {
        logits[size_t(b) * n + first + r] = value;
      }
      uint key = order_key(value);
      if (token >= 0 && better(key, uint(token), best_key, best_token)) {
        best_key = key;
        best_token = uint(token);
      }
    }
  }
  if (lane == 0) {
    const uint per_row = threadgroups_per_grid.x * simdgroups_per_threadgroup;
    size_t at = 2 * (size_t(b) * per_row + slot_in_row);
    partials[at] = best_key;
    partials[at + 1] = best_token;
  }

// ---- kernel cluster_argmax_reduce ----
  const uint n = partials_shape[1];  // pairs per row of h
  const uint b = threadgroup_position_in_grid.y;
  const uint tid = thread_index_in_threadgroup;
  const uint lane = thread_index_in_simdgroup, sg = simdgroup_index_in_threadgroup;
  uint best_key = 0, best_token = 0xffffffffu;
  for (uint i = tid; i < n; i += threads_per_threadgroup.x) {
    uint key = partials[2 * (size_t(b) * n + i)], token = partials[2 * (size_t(b) * n + i) + 1];
    if (better(key, token, best_key, best_token)) {
      best_key = key;
      best_token = token;
    }
  }
  simd_best(best_key, best_token);
  threadgroup uint buf[2 * MAX_SIMDGROUPS];
  if (lane == 0) {
    buf[2 * sg] = best_key;
    buf[2 * sg + 1] = best_token;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    for (uint i = 1; i < simdgroups_per_threadgroup; i++) {
      if (better(buf[2 * i], buf[2 * i + 1], best_key, best_token)) {
        best_key = buf[2 * i];
        best_token = buf[2 * i + 1];
      }
    }
    tokens[b] = int(best_token);
  }
