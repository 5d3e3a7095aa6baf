// SHA-256 (FIPS 180-4), self-contained: the runner cross compiles without OpenSSL or other
// libraries. Used to check the integrity record of exported modules before they are loaded.
#ifndef PSB_RUNNER_SHA256_H_
#define PSB_RUNNER_SHA256_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace psb_runner {

/*! \brief Incremental SHA-256: Update() any number of times, then HexDigest() once. */
class Sha256 {
 public:
  Sha256();
  void Update(const void* data, size_t size);
  /*! \brief The digest as 64 lowercase hex digits (like Python's hashlib hexdigest()). Finalizes. */
  std::string HexDigest();

 private:
  void Block(const unsigned char* p);

  uint32_t h_[8];
  unsigned char buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;  // bytes hashed so far
  bool done_ = false;
};

/*! \brief SHA-256 of ``size`` bytes as 64 lowercase hex digits. */
std::string Sha256Hex(const void* data, size_t size);

}  // namespace psb_runner

#endif  // PSB_RUNNER_SHA256_H_
