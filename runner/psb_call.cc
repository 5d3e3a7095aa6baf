// psb_call: call any function of a module exported by psb_tvm with .npy tensors and shapes, and
// write its outputs as .npy. A test tool (tests/test_runner.py runs the aarch64 build under qemu to
// check the attention kernels, which psb_run does not reach), not a product: no input checks.
//
//   psb_call MODEL.so FUNCTION OUT_PREFIX ARG...     ARG: a .npy path (a tensor) or shape:d0,d1,...
//   psb_call --parse-metadata FILE.json              print what ParseMetadata read, one field per line
//
// Writes OUT_PREFIX0.npy, OUT_PREFIX1.npy, ... (one per output). Exit status 0, or 1 on any error.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "psb_runner.h"

namespace {

template <typename T>
std::string Join(const std::vector<T>& items) {
  std::ostringstream out;
  for (size_t i = 0; i < items.size(); ++i) out << (i ? "," : "") << items[i];
  return out.str();
}

// tests/test_runner.py compares these lines with psb_tvm.metadata.ModuleMetadata's fields.
int ParseMetadataFile(const char* path) {
  std::ifstream f(path);
  std::stringstream text;
  text << f.rdbuf();
  psb_runner::Metadata md = psb_runner::ParseMetadata(text.str());
  for (const auto& in : md.inputs) std::cout << "input=" << in.name << ":" << in.dtype << ":" << Join(in.shape) << "\n";
  std::cout << "outputs=" << Join(md.outputs) << "\n";
  std::cout << "samples=" << md.samples << "\nseed=" << md.seed << "\nn_max=" << md.n_max << "\n";
  std::cout << "layer_samples=" << Join(md.layer_samples) << "\nfrozen=" << md.frozen << "\n";
  for (const auto& a : md.runtime_args) std::cout << "runtime_arg=" << a.name << ":" << a.kind << ":" << a.length << "\n";
  std::cout << "unsupported=" << md.unsupported << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--parse-metadata") {
    try {
      return ParseMetadataFile(argv[2]);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "psb_call: error: %s\n", e.what());
      return 1;
    }
  }
  if (argc < 4) {
    std::fprintf(stderr, "usage: psb_call MODEL.so FUNCTION OUT_PREFIX [ARG...]  (ARG: x.npy or shape:d0,d1,...)\n");
    return 1;
  }
  try {
    psb_runner::Model model(argv[1]);
    std::vector<psb_runner::Model::CallArg> args;
    for (int i = 4; i < argc; ++i) {
      std::string a = argv[i];
      psb_runner::Model::CallArg arg;
      if (a.rfind("shape:", 0) == 0) {
        std::string dims = a.substr(6);
        size_t start = 0;
        while (start < dims.size()) {
          size_t comma = dims.find(',', start);
          if (comma == std::string::npos) comma = dims.size();
          arg.shape.push_back(std::stoll(dims.substr(start, comma - start)));
          start = comma + 1;
        }
      } else {
        arg.tensor = psb_runner::ReadNpy(a);
      }
      args.push_back(std::move(arg));
    }
    std::vector<psb_runner::HostTensor> out = model.CallFunction(argv[2], args);
    std::vector<std::string> paths;
    for (size_t i = 0; i < out.size(); ++i) paths.push_back(std::string(argv[3]) + std::to_string(i) + ".npy");
    psb_runner::WriteNpyFiles(paths, out);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "psb_call: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
