# Build facts for `slab info` and for the import-time error messages: writes _build_info.json
# into the build tree (next to libslab_ops.so, so a development build loaded through SLAB_LIBRARY
# finds it too) and installs it into the package folder. Included at the end of CMakeLists.txt,
# in its scope: it reads TORCH_CUDA_VERSION, SLAB_WITH_CUDA, SLAB_CUDA_ARCHS and the CPU kernels'
# -m options that CMakeLists.txt set. Everything runs at configure time.

# A JSON string literal (quotes, backslashes and control characters escaped).
function(_slab_json_string out value)
  string(REPLACE "\\" "\\\\" value "${value}")
  string(REPLACE "\"" "\\\"" value "${value}")
  string(REPLACE "\n" "\\n" value "${value}")
  string(REPLACE "\r" "\\r" value "${value}")
  string(REPLACE "\t" "\\t" value "${value}")
  set(${out} "\"${value}\"" PARENT_SCOPE)
endfunction()

# A JSON array of strings from a CMake list.
function(_slab_json_string_list out)
  set(_items "")
  foreach(_v IN LISTS ARGN)
    _slab_json_string(_q "${_v}")
    list(APPEND _items "${_q}")
  endforeach()
  list(JOIN _items ", " _joined)
  set(${out} "[${_joined}]" PARENT_SCOPE)
endfunction()

# slab version: the one line `__version__ = "..."` of python/slab/__init__.py (the same line
# scikit-build-core's regex provider reads for the wheel's version).
set(_bi_version "unknown")
file(STRINGS "${CMAKE_CURRENT_SOURCE_DIR}/python/slab/__init__.py" _bi_version_line
     REGEX "^__version__ *= *[\"'][^\"']+[\"']")
if(_bi_version_line MATCHES "[\"']([^\"']+)[\"']")
  set(_bi_version "${CMAKE_MATCH_1}")
endif()

# git commit of the source tree; "+dirty" when tracked files differ from it; "unknown" outside a
# git checkout (an sdist) or without git.
set(_bi_commit "unknown")
find_package(Git QUIET)
if(GIT_FOUND)
  execute_process(COMMAND "${GIT_EXECUTABLE}" -C "${CMAKE_CURRENT_SOURCE_DIR}" rev-parse --short HEAD
                  OUTPUT_VARIABLE _bi_git_out ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE
                  RESULT_VARIABLE _bi_git_rc)
  if(_bi_git_rc EQUAL 0 AND NOT _bi_git_out STREQUAL "")
    set(_bi_commit "${_bi_git_out}")
    execute_process(COMMAND "${GIT_EXECUTABLE}" -C "${CMAKE_CURRENT_SOURCE_DIR}" diff --quiet HEAD --
                    RESULT_VARIABLE _bi_dirty_rc OUTPUT_QUIET ERROR_QUIET)
    if(_bi_dirty_rc EQUAL 1)
      string(APPEND _bi_commit "+dirty")
    endif()
  endif()
endif()

# The torch this build compiles against (the Python that builds us imports it).
set(_bi_torch "unknown")
execute_process(COMMAND "${Python_EXECUTABLE}" -c "import torch; print(torch.__version__)"
                OUTPUT_VARIABLE _bi_torch_out ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE
                RESULT_VARIABLE _bi_torch_rc)
if(_bi_torch_rc EQUAL 0 AND NOT _bi_torch_out STREQUAL "")
  set(_bi_torch "${_bi_torch_out}")
endif()

# CUDA kernels: architectures and nvcc, only when they are built.
set(_bi_archs "")
set(_bi_nvcc "")
if(SLAB_WITH_CUDA)
  set(_bi_cuda "true")
  set(_bi_archs ${SLAB_CUDA_ARCHS})
  set(_bi_nvcc "${CMAKE_CUDA_COMPILER_VERSION}")
else()
  set(_bi_cuda "false")
endif()

# CPU ISA of the CPU kernels: the -m<feature> options CMakeLists.txt gives their sources
# (_cpu_kernel_options), so this cannot drift from the real flags; without them, the rule those
# options follow (AVX2 + FMA + F16C on x86-64, portable code elsewhere).
set(_bi_isa_flags "")
if(DEFINED _cpu_kernel_options)
  foreach(_opt IN LISTS _cpu_kernel_options)
    if(_opt MATCHES "^-m([a-z0-9]+)$")
      list(APPEND _bi_isa_flags "${CMAKE_MATCH_1}")
    endif()
  endforeach()
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64")
  set(_bi_isa_flags avx2 fma f16c)
endif()
if(_bi_isa_flags)
  string(TOUPPER "${_bi_isa_flags}" _bi_isa_upper)
  list(JOIN _bi_isa_upper "+" _bi_isa_joined)
  set(_bi_isa "x86-64 ${_bi_isa_joined}")
else()
  set(_bi_isa "portable")
endif()

_slab_json_string(_bi_slab_version "${_bi_version}")
_slab_json_string(_bi_git_commit "${_bi_commit}")
_slab_json_string(_bi_torch_version "${_bi_torch}")
_slab_json_string(_bi_torch_cuda_version "${TORCH_CUDA_VERSION}")
_slab_json_string(_bi_stable_abi_target "2.11")
_slab_json_string_list(_bi_cuda_archs ${_bi_archs})
_slab_json_string(_bi_nvcc_version "${_bi_nvcc}")
_slab_json_string(_bi_cpu_isa "${_bi_isa}")
_slab_json_string_list(_bi_cpu_isa_flags ${_bi_isa_flags})
_slab_json_string(_bi_system_processor "${CMAKE_SYSTEM_PROCESSOR}")
string(STRIP "${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION}" _bi_cxx)
_slab_json_string(_bi_cxx_compiler "${_bi_cxx}")
_slab_json_string(_bi_build_type "${CMAKE_BUILD_TYPE}")

configure_file("${CMAKE_CURRENT_LIST_DIR}/build_info.json.in" "${CMAKE_CURRENT_BINARY_DIR}/_build_info.json" @ONLY)
install(FILES "${CMAKE_CURRENT_BINARY_DIR}/_build_info.json" DESTINATION slab)
message(STATUS "slab: build info ${_bi_version} (commit ${_bi_commit}), torch ${_bi_torch}, CPU ISA ${_bi_isa}")
