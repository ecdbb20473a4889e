// edgemoe testbench: every task's sample through the accelerator (OP_FORWARD, experts in DDR as
// Edge-MoE keeps them), compared with the PyTorch reference (MSE, max error) and, bit for bit, with
// edgemoe's emulator. Usage: tb <hls folder> (run_hls.tcl passes it); exit 0 when every task
// matches the emulator exactly and its MSE is within TB_MSE_LIMIT.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "edgemoe_config.h"
#include "edgemoe_top.h"

static bool read_file(const std::string &path, std::vector<char> &out) {
  FILE *f = fopen(path.c_str(), "rb");
  if (!f) return false;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  out.resize(n);
  bool ok = n == 0 || fread(out.data(), 1, n, f) == (size_t)n;
  fclose(f);
  return ok;
}

int main(int argc, char **argv) {
  std::string root = argc > 1 ? argv[1] : ".";
  std::vector<char> params_bytes;
  if (!read_file(root + "/../params.bin", params_bytes)) {
    fprintf(stderr, "tb: cannot read %s/../params.bin\n", root.c_str());
    return 2;
  }
  std::vector<int16_t> params(params_bytes.size() / 2);
  memcpy(params.data(), params_bytes.data(), params_bytes.size());
  FILE *list = fopen((root + "/data/experts.txt").c_str(), "r");
  if (!list) {
    fprintf(stderr, "tb: cannot read %s/data/experts.txt\n", root.c_str());
    return 2;
  }
  std::vector<std::vector<int> > task_layer(cfg::TASKS), task_expert(cfg::TASKS);
  std::vector<std::vector<std::string> > task_file(cfg::TASKS);
  int t, l, e;
  char file[512];
  while (fscanf(list, "%d %d %d %511s", &t, &l, &e, file) == 4) {
    task_layer[t].push_back(l);
    task_expert[t].push_back(e);
    task_file[t].push_back(file);
  }
  fclose(list);
  const int FA = cfg::act_t::width - cfg::act_t::iwidth;
  int failures = 0;
  for (int task = 0; task < cfg::TASKS; task++) {
    char name[64];
    snprintf(name, sizeof name, "/data/task%d", task);
    std::vector<char> in_bytes, ref_bytes, emu_bytes;
    if (!read_file(root + name + "_input.bin", in_bytes) || !read_file(root + name + "_ref.bin", ref_bytes) ||
        !read_file(root + name + "_emu.bin", emu_bytes)) {
      fprintf(stderr, "tb: missing data files for task %d\n", task);
      return 2;
    }
    // The pool holds this task's experts only, one slot each.
    std::vector<int16_t> pool((size_t)task_file[task].size() * cfg::EXPERT_WORDS);
    std::vector<int32_t> slots(cfg::MOE_LAYERS * cfg::EXPERTS, -1);
    for (size_t i = 0; i < task_file[task].size(); i++) {
      std::vector<char> blob;
      if (!read_file(root + "/../" + task_file[task][i], blob) || blob.size() != (size_t)cfg::EXPERT_WORDS * 2) {
        fprintf(stderr, "tb: bad expert blob %s\n", task_file[task][i].c_str());
        return 2;
      }
      memcpy(&pool[i * cfg::EXPERT_WORDS], blob.data(), blob.size());
      slots[task_layer[task][i] * cfg::EXPERTS + task_expert[task][i]] = (int32_t)i;
    }
    size_t n = ref_bytes.size() / 4;
    std::vector<int32_t> input(in_bytes.size() / 4), output(n), emu(n), state(cfg::ST_WORDS);
    std::vector<float> ref(n);
    memcpy(input.data(), in_bytes.data(), in_bytes.size());
    memcpy(ref.data(), ref_bytes.data(), ref_bytes.size());
    memcpy(emu.data(), emu_bytes.data(), emu_bytes.size());
    int status = edgemoe_top(OP_FORWARD, task, 0, 0, 0, params.data(), pool.data(), slots.data(), input.data(),
                             output.data(), state.data());
    double se = 0, worst = 0;
    size_t diff = 0;
    for (size_t i = 0; i < n; i++) {
      double y = ldexp((double)output[i], -FA), err = fabs(y - ref[i]);
      se += err * err;
      worst = err > worst ? err : worst;
      diff += output[i] != emu[i];
    }
    double mse = se / (double)n;
    bool ok = status == 1 && diff == 0 && mse <= cfg::TB_MSE_LIMIT;
    printf("task %d: status %d, MSE %.3e, max error %.3e vs PyTorch; %zu of %zu values differ from the emulator: %s\n",
           task, status, mse, worst, diff, n, ok ? "PASS" : "FAIL");
    failures += !ok;
  }
  return failures ? 1 : 0;
}
