# Toolchain file: cross compile psb_run for 64-bit Arm Linux with Debian's gcc cross toolchain
# (apt-get install g++-aarch64-linux-gnu). Run the result under emulation with
#   qemu-aarch64 -L /usr/aarch64-linux-gnu ./psb_run ...
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(PSB_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "cross toolchain prefix")
set(CMAKE_C_COMPILER "${PSB_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${PSB_CROSS_PREFIX}g++")

set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)
