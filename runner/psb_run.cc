// psb_run: run a module exported by psb_tvm (PSBModule.export_library) on .npy files.
//
//   psb_run MODEL.so --input a.npy [--input b.npy ...] --output out.npy [--output out2.npy ...]
//           [--samples N] [--seed S] [--time R] [--nonfinite error|propagate] [--metadata]
//
// --nonfinite: what a NaN or infinity in a float input does, as in Python's
// PSBModule.run(..., nonfinite=...) / psb-tvm run --nonfinite: "error" (default) refuses the
// inputs; "propagate" runs the model on them with those values set to 0 and writes NaN for the
// outputs of the batch items that had any (every output row of that item along axis 0, or the
// whole output when it has no such batch axis); the other items are bit-identical to a run on the
// cleaned inputs, and --time times the cleaned inputs.
//
// Exit status: 0 on success; 1 on any error with the module (missing, truncated, damaged or edited:
// its integrity record is checked before it is loaded), the inputs (unreadable, wrong count, shape
// or dtype, NaN/infinity with --nonfinite error, or with propagate when an output is not a float
// and cannot be marked NaN) or the outputs (a directory, an unwritable path); 2 on bad usage:
// unknown or repeated options, a missing value, --nonfinite not error/propagate, --time not in
// [1, 1000000], --samples not a power of two >= 1, --seed not in [0, 2**32), and --samples/--seed
// that the module cannot take (above its n_max, or a module with n and seed fixed at compile time).
// Outputs are written all-or-nothing: on any error no regular output file is created or replaced.
// A symlink is followed (its target is replaced, the link kept), a character device or FIFO
// (/dev/null, a pipe) is written through, a directory is refused before the model runs.

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "psb_runner.h"

namespace {

const char* kUsage =
    "usage: psb_run MODEL.so --input IN.npy [--input IN2.npy ...] --output OUT.npy [--output OUT2.npy ...]\n"
    "               [--samples N] [--seed S] [--time R] [--nonfinite MODE] [--metadata]\n"
    "\n"
    "Runs main() of a module exported by psb_tvm (PSBModule.export_library) on the CPU.\n"
    "  --input PATH   a .npy file per model input, in the model's input order\n"
    "  --output PATH  a .npy file per model output (written only if everything succeeds)\n"
    "  --samples N    sample count n (only for modules with run-time sample control)\n"
    "  --seed S       sample draw (only for modules with run-time sample control)\n"
    "  --time R       after the run, call main R more times and print the median latency in ms\n"
    "  --nonfinite MODE  NaN/infinity in a float input: error (default: refused) or propagate (run\n"
    "                 with them set to 0, NaN outputs for the batch items that had any)\n"
    "  --metadata     print the module's PSB metadata JSON (alone: print it and exit)\n"
    "Outputs: a symlink is followed, /dev/null or a FIFO is written through, a directory is refused.\n"
    "Exit status: 0 ok, 1 bad module (missing, truncated, damaged, not from export_library),\n"
    "inputs or outputs, 2 bad usage (options, --samples/--seed values the module cannot take).\n"
    "Threads: set TVM_NUM_THREADS (the TVM runtime defaults to 1).\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int64_t ParseInt(const std::string& flag, const std::string& text) {
  if (text.empty()) throw UsageError(flag + " needs an integer, got ''");
  errno = 0;
  char* end = nullptr;
  long long v = std::strtoll(text.c_str(), &end, 10);
  if (errno != 0 || end == nullptr || *end != '\0')
    throw UsageError(flag + " needs an integer, got '" + text + "'");
  return static_cast<int64_t>(v);
}

struct Args {
  std::string model;
  std::vector<std::string> inputs, outputs;
  std::optional<int64_t> samples, seed;
  std::optional<int64_t> time;
  bool metadata = false;
  std::optional<psb_runner::NonFinite> nonfinite;
};

Args ParseArgs(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string flag = arg, value;
    bool has_inline = false;
    if (arg.rfind("--", 0) == 0) {
      size_t eq = arg.find('=');
      if (eq != std::string::npos) {
        flag = arg.substr(0, eq);
        value = arg.substr(eq + 1);
        has_inline = true;
      }
    }
    auto take = [&]() -> std::string {
      if (has_inline) return value;
      if (i + 1 >= argc) throw UsageError(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (flag == "--input") {
      a.inputs.push_back(take());
    } else if (flag == "--output") {
      a.outputs.push_back(take());
    } else if (flag == "--samples") {
      if (a.samples) throw UsageError("--samples given twice");
      a.samples = ParseInt(flag, take());
      if (*a.samples < 1 || (*a.samples & (*a.samples - 1)) != 0)
        throw UsageError("--samples must be a power of two >= 1, got " + std::to_string(*a.samples));
    } else if (flag == "--seed") {
      if (a.seed) throw UsageError("--seed given twice");
      a.seed = ParseInt(flag, take());
      if (*a.seed < 0 || *a.seed >= (int64_t{1} << 32))
        throw UsageError("--seed must be in [0, 2**32), got " + std::to_string(*a.seed));
    } else if (flag == "--time") {
      if (a.time) throw UsageError("--time given twice");
      a.time = ParseInt(flag, take());
      if (*a.time < 1 || *a.time > 1000000) throw UsageError("--time needs a count in [1, 1000000]");
    } else if (flag == "--metadata") {
      if (has_inline) throw UsageError("--metadata takes no value");
      a.metadata = true;
    } else if (flag == "--nonfinite") {
      if (a.nonfinite) throw UsageError("--nonfinite given twice");
      std::string mode = take();
      if (mode != "error" && mode != "propagate")
        throw UsageError("--nonfinite must be error or propagate, got '" + mode + "'");
      a.nonfinite = psb_runner::ParseNonFinite(mode);
    } else if (arg.size() > 1 && arg[0] == '-') {
      throw UsageError("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 1)
    throw UsageError(positional.empty() ? "missing MODEL.so" : "expected one MODEL.so, got " +
                                                                   std::to_string(positional.size()) + " positional arguments");
  a.model = positional[0];
  bool runs = !a.inputs.empty() || !a.outputs.empty() || a.time || a.samples || a.seed;
  if (!runs && !a.metadata) throw UsageError("nothing to do: give --input/--output (or --metadata)");
  if (runs && a.outputs.empty() && !a.time) throw UsageError("missing --output");
  return a;
}

int Main(int argc, char** argv) {
  Args args;
  try {
    args = ParseArgs(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "psb_run: " << e.what() << "\n" << kUsage;
    return 2;
  }
  try {
    psb_runner::Model model(args.model);
    const psb_runner::Metadata& md = model.metadata();
    if (args.metadata) {
      std::cout << md.json << std::endl;
      if (args.inputs.empty() && args.outputs.empty() && !args.time && !args.samples && !args.seed) return 0;
    }
    psb_runner::RunOptions opt;
    opt.samples = args.samples;
    opt.seed = args.seed;
    opt.nonfinite = args.nonfinite.value_or(psb_runner::NonFinite::kError);
    if (!md.unsupported.empty()) throw psb_runner::Error("cannot run this module: " + md.unsupported);
    try {
      model.CheckOptions(opt);
    } catch (const psb_runner::Error& e) {  // --samples/--seed this module cannot take: bad usage
      std::cerr << "psb_run: " << e.what() << std::endl;
      return 2;
    }
    if (!args.outputs.empty() && !md.outputs.empty() && args.outputs.size() != md.outputs.size()) {
      std::string names;
      for (const auto& n : md.outputs) names += (names.empty() ? "" : ", ") + n;
      throw psb_runner::Error("the model has " + std::to_string(md.outputs.size()) + " output(s) [" + names +
                              "], got " + std::to_string(args.outputs.size()) + " --output");
    }
    // Fail early (before running the model) when an output cannot be written.
    psb_runner::CheckOutputPaths(args.outputs);
    std::vector<psb_runner::HostTensor> inputs;
    for (const auto& p : args.inputs) inputs.push_back(psb_runner::ReadNpy(p));
    model.CheckInputs(inputs);
    if (opt.nonfinite == psb_runner::NonFinite::kError)  // here, to name the file too
      for (size_t i = 0; i < inputs.size(); ++i)
        psb_runner::CheckFinite(inputs[i], args.inputs[i] + " (input '" + md.inputs[i].name + "')",
                                "pass --nonfinite propagate to get NaN outputs for such batch items instead");
    if (!args.outputs.empty()) {
      std::vector<psb_runner::HostTensor> outputs = model.Run(inputs, opt);
      psb_runner::WriteNpyFiles(args.outputs, outputs);
    }
    if (args.time) {
      std::vector<double> ms = model.Time(inputs, static_cast<int>(*args.time), opt);
      std::printf("median latency: %.4f ms over %lld runs\n", psb_runner::Median(ms),
                  static_cast<long long>(*args.time));
    }
    return 0;
  } catch (const psb_runner::Error& e) {
    std::cerr << "psb_run: error: " << e.what() << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "psb_run: error: " << e.what() << std::endl;
  }
  return 1;
}

}  // namespace

int main(int argc, char** argv) { return Main(argc, argv); }
