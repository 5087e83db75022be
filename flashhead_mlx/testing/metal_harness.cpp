// A standalone executable that runs one emulated kernel, for the sanitizer builds: compiled with
// the kernel and the scheduler under AddressSanitizer and UndefinedBehaviorSanitizer, which a
// Python process could only load preloaded. Usage: harness IN OUT. IN holds n (int64), the
// launch config (int64[10]), then n buffers, each as bytes, offset of element 0, is_output
// (int64 each) and its bytes; each buffer gets its own heap block, so that AddressSanitizer's
// red zones surround it. OUT gets the outputs' bytes, in order. Exit status 0; 3 after an
// emulator error (its message on stderr); a sanitizer's report exits with its own status.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

extern "C" int emu_launch(void** buffers, const int64_t* config, const int64_t* ranges,
                          int n_ranges, char* message, int message_size, void** fault);

static void read_exactly(FILE* f, void* data, size_t bytes) {
  if (bytes && fread(data, 1, bytes, f) != bytes) {
    fprintf(stderr, "harness: truncated input\n");
    exit(4);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 4;
  }
  FILE* in = fopen(argv[1], "rb");
  if (!in) return 4;
  int64_t n, config[10];
  read_exactly(in, &n, sizeof n);
  read_exactly(in, config, sizeof config);
  const size_t count = static_cast<size_t>(n);
  std::vector<char*> blocks(count);
  std::vector<void*> pointers(count);
  std::vector<int64_t> sizes(count), outputs;
  for (int64_t i = 0; i < n; i++) {
    int64_t header[3];
    read_exactly(in, header, sizeof header);
    sizes[size_t(i)] = header[0];
    blocks[size_t(i)] = static_cast<char*>(malloc(size_t(header[0] ? header[0] : 1)));
    read_exactly(in, blocks[size_t(i)], size_t(header[0]));
    pointers[size_t(i)] = blocks[size_t(i)] + header[1];
    if (header[2]) outputs.push_back(i);
  }
  fclose(in);
  char message[512] = "";
  void* fault = nullptr;
  int status = emu_launch(pointers.data(), config, nullptr, 0, message, sizeof message, &fault);
  if (status) {
    fprintf(stderr, "emulator: %s\n", message);
    return 3;
  }
  FILE* out = fopen(argv[2], "wb");
  if (!out) return 4;
  for (int64_t i : outputs) fwrite(blocks[size_t(i)], 1, size_t(sizes[size_t(i)]), out);
  fclose(out);
  for (char* block : blocks) free(block);
  return 0;
}
