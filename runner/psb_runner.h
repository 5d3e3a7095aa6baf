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
/*!
 * \brief Write ``tensor`` as .npy (v1 header, v2 when the header is too long) to ``path``, with
 * the rules of WriteNpyFiles (all-or-nothing, links followed, devices written through).
 */
void WriteNpy(const std::string& path, const HostTensor& tensor);
/*!
 * \brief Check that every path can take an output, before anything runs: a symlink is followed
 * (its target is the file written), an existing regular file or a new name in an existing,
 * writable directory is fine, a character device or FIFO (/dev/null, a pipe) is written
 * through; a directory or any other non-regular file, or the same file twice, is an Error.
 */
void CheckOutputPaths(const std::vector<std::string>& paths);
/*!
 * \brief Write several tensors all-or-nothing, like psb_tvm.files.write_output: each output that
 * is (or will be) a regular file goes to a temp file next to its destination, and they are
 * renamed into place only after every one was written. Symlinks are followed (the link's target
 * is replaced, the link kept); character devices and FIFOs are written through (open + write,
 * never replaced by a regular file); directories and other non-regular files are refused. The
 * result has the permissions a plain write would give: the mode of the file it replaces, else
 * 0666 less the umask. On error no regular destination is created or modified and the temp
 * files are removed (bytes already written to a device or FIFO cannot be taken back; those are
 * written after every temp file is complete).
 */
void WriteNpyFiles(const std::vector<std::string>& paths, const std::vector<HostTensor>& tensors);

/*!
 * \brief Flat index of the first NaN or infinity in a float16/32/64 tensor; nullopt when every
 * value is finite or the dtype is not a float.
 */
std::optional<size_t> FirstNonFinite(const HostTensor& tensor);
/*!
 * \brief Throw Error when ``tensor`` holds a NaN or infinity, naming ``what``, the value and its
 * index: "<what>: non-finite value nan at index (0, 0, 3, 5) (<hint>)".
 */
void CheckFinite(const HostTensor& tensor, const std::string& what, const std::string& hint = "");

/*! \brief The integrity record at the end of a module written by PSBModule.export_library. */
struct ModuleRecord {
  int64_t format = 0;
  int64_t library_bytes = 0;   // size of the shared library in front of the record
  std::string library_sha256;  // its SHA-256, 64 lowercase hex digits
};

/*!
 * \brief Check the integrity record of ``path`` (layout: library bytes, JSON record, 8-byte magic
 * "PSBTVM\0\1", uint64 little-endian JSON length; see psb_tvm/files.py) and the SHA-256 of the
 * library, without loading anything. Throws Error naming the file when it is truncated, damaged,
 * edited, or was not written by PSBModule.export_library. Model's constructor calls it first.
 */
ModuleRecord VerifyModule(const std::string& path);

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

/*! \brief The newest metadata layout this runner reads (psb_tvm.metadata.FORMAT_VERSION). */
constexpr int64_t kMetadataFormatVersion = 1;

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

/*!
 * \brief What Run/Time do with a NaN or infinity in a float input; the same as Python's
 * ``PSBModule.run(..., nonfinite=...)`` (psb_tvm/runtime.py).
 */
enum class NonFinite {
  kError,      //!< "error" (default): throw Error naming the input and the first bad index
  kPropagate,  //!< "propagate": run on the inputs with them set to 0, then make the outputs of the
               //!< batch items that had any NaN (CleanNonFinite, PoisonItems); the others are unchanged
};
/*! \brief "error" -> kError, "propagate" -> kPropagate; throws Error for any other name. */
NonFinite ParseNonFinite(const std::string& name);
/*! \brief The name of ``mode``: "error" or "propagate". */
std::string NonFiniteName(NonFinite mode);

/*!
 * \brief The first half of NonFinite::kPropagate: set every NaN or infinity in the float16/32/64
 * tensors of ``inputs`` to +0 and return the batch items that had any (size B, all false when
 * none). B is the leading dimension shared by every input of rank >= 1 (rank-0 inputs do not
 * count), else 1. An input whose leading dimension is B marks the items of its bad rows; any other
 * input with a bad value marks every item.
 */
std::vector<bool> CleanNonFinite(std::vector<HostTensor>* inputs);
/*!
 * \brief The second half: when any of ``items`` is marked, set the rows of the marked items of each
 * output whose leading dimension is ``items.size()`` to NaN, and all of any other output. Throws
 * Error "nonfinite='propagate' cannot mark a <dtype> output NaN; pass finite inputs" for an output
 * that is not float16/32/64 (then ``outputs`` may be partly changed).
 */
void PoisonItems(std::vector<HostTensor>* outputs, const std::vector<bool>& items);

/*! \brief Per-call options; samples/seed only accepted by modules whose metadata has "runtime_args". */
struct RunOptions {
  std::optional<int64_t> samples;
  std::optional<int64_t> seed;
  /*! \brief NaN / infinity in float inputs: refused (default) or propagated to the batch items' outputs. */
  NonFinite nonfinite = NonFinite::kError;
};

/*! \brief A loaded psb_tvm module on the CPU (Relax VM, pooled allocator). */
class Model {
 public:
  /*!
   * \brief Load ``path`` (a .so from PSBModule.export_library); throws Error. The integrity record
   * is checked (VerifyModule) before the library is opened: a module is native code, load only
   * modules you trust.
   */
  explicit Model(const std::string& path);
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const Metadata& metadata() const;

  /*!
   * \brief Check count, dtype and shape of ``inputs`` against the metadata; throws Error. NaN and
   * infinities are handled by Run/Time (see RunOptions::nonfinite), not here.
   */
  void CheckInputs(const std::vector<HostTensor>& inputs) const;
  /*! \brief Check ``options`` against the module (runtime_args present, valid values); throws Error. */
  void CheckOptions(const RunOptions& options) const;

  /*!
   * \brief Run ``main`` once; returns its outputs (one tensor, or the fields of a tuple). With
   * NonFinite::kPropagate, ``main`` runs on the inputs cleaned by CleanNonFinite and the outputs of
   * the marked batch items are NaN (PoisonItems); the other items are bit-identical to a run on the
   * cleaned inputs.
   */
  std::vector<HostTensor> Run(const std::vector<HostTensor>& inputs, const RunOptions& options = {});

  /*! \brief One argument of CallFunction: a tensor, or a shape (a Relax ``R.Shape``). */
  struct CallArg {
    std::optional<HostTensor> tensor;
    std::vector<int64_t> shape;
  };
  /*!
   * \brief Call any function of the module (``attend``, ``probe``, ``weights``, ...) with tensors
   * and shapes, no checks beyond the VM's own; returns its outputs like Run. For tests and tools
   * that drive the module's other entry points (tools/psb_call.cc).
   */
  std::vector<HostTensor> CallFunction(const std::string& name, const std::vector<CallArg>& args);

  /*!
   * \brief Call ``main`` ``repeats`` times on the same inputs (after one warm-up call) and return
   * the wall time of each call in milliseconds; inputs are copied to runtime tensors once, outside
   * the timed region. With NonFinite::kPropagate the cleaned inputs are timed.
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
