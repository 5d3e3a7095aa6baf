// psb_runner: load a module exported by psb_tvm (PSBModule.export_library) and run it from C++.
//
// Depends only on the tvm-ffi headers and, at run time, on libtvm_ffi.so + libtvm_runtime.so (the
// latter registers the Relax VM loader; link it with --no-as-needed). Every failure is reported as
// psb_runner::Error with a message that names the bad input.
#ifndef PSB_RUNNER_H_
#define PSB_RUNNER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace psb_runner {

/*! \brief Every deliberate error (bad file, bad input, not a psb module, ...). */
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/*! \brief A dense, C-ordered host tensor. ``dtype`` uses numpy/TVM names ("float32", "int64"). */
struct HostTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<unsigned char> data;  // numel() * ItemSize(dtype) bytes, little-endian

  size_t numel() const;
  std::string ShapeString() const;  // "(4, 1, 8, 8)"
};

/*! \brief Bytes per element of a supported dtype name; throws Error for unsupported names. */
size_t ItemSize(const std::string& dtype);
/*! \brief The dtype names the runner (and its .npy reader/writer) supports. */
std::vector<std::string> SupportedDTypes();

/*! \brief Read a .npy file (format v1/v2/v3, little-endian, C order, numeric dtypes). */
HostTensor ReadNpy(const std::string& path);
/*! \brief Write ``tensor`` as .npy (v1 header, v2 when the header is too long) directly to ``path``. */
void WriteNpy(const std::string& path, const HostTensor& tensor);
/*!
 * \brief Write several tensors all-or-nothing: each goes to a temp file next to its destination,
 * and they are renamed into place only after every one was written. On error no destination is
 * created or modified and the temp files are removed.
 */
void WriteNpyFiles(const std::vector<std::string>& paths, const std::vector<HostTensor>& tensors);

struct TensorInfo {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;
};

/*! \brief A run-time argument of ``main`` after the model inputs ("runtime_args" metadata). */
struct RuntimeArgInfo {
  std::string name;  // "samples" (one n for every PSB layer) or "seed"
  std::string kind;  // "shape" (an ffi::Shape of ``length`` copies of the value) or "int" (int64)
  int64_t length = 0;
};

/*! \brief The parts of the module's ``psb_metadata()`` JSON the runner uses. */
struct Metadata {
  std::string json;  // the full text, as stored in the module
  std::vector<TensorInfo> inputs;
  std::vector<std::string> outputs;  // output names (may be empty if the module does not list them)
  int64_t samples = 0;               // n and seed fixed at compile time
  int64_t seed = 0;
  std::vector<int64_t> layer_samples;  // per-PSB-layer default n ("layer_samples"), empty: all at samples
  int64_t n_max = 0;                 // "n_max" (or config.n_max), 0 when absent
  bool frozen = false;               // the draw is baked into constants
  bool has_runtime_args = false;     // non-empty "runtime_args": samples/seed can be chosen per call
  std::vector<RuntimeArgInfo> runtime_args;
  std::string unsupported;  // non-empty: main needs a run-time argument this runner cannot pass
};

/*! \brief Parse the metadata JSON (throws Error when required fields are missing or malformed). */
Metadata ParseMetadata(const std::string& json);

/*! \brief Per-call options; only accepted by modules whose metadata has "runtime_args". */
struct RunOptions {
  std::optional<int64_t> samples;
  std::optional<int64_t> seed;
};

/*! \brief A loaded psb_tvm module on the CPU (Relax VM, pooled allocator). */
class Model {
 public:
  /*! \brief Load ``path`` (a .so from PSBModule.export_library); throws Error. */
  explicit Model(const std::string& path);
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const Metadata& metadata() const;

  /*! \brief Check count, dtype and shape of ``inputs`` against the metadata; throws Error. */
  void CheckInputs(const std::vector<HostTensor>& inputs) const;
  /*! \brief Check ``options`` against the module (runtime_args present, valid values); throws Error. */
  void CheckOptions(const RunOptions& options) const;

  /*! \brief Run ``main`` once; returns its outputs (one tensor, or the fields of a tuple). */
  std::vector<HostTensor> Run(const std::vector<HostTensor>& inputs, const RunOptions& options = {});

  /*!
   * \brief Call ``main`` ``repeats`` times on the same inputs (after one warm-up call) and return
   * the wall time of each call in milliseconds; inputs are copied to runtime tensors once, outside
   * the timed region.
   */
  std::vector<double> Time(const std::vector<HostTensor>& inputs, int repeats,
                           const RunOptions& options = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/*! \brief Median of ``values`` (mean of the middle two for an even count); 0 when empty. */
double Median(std::vector<double> values);

}  // namespace psb_runner

#endif  // PSB_RUNNER_H_
