// fmt's compiled part, built once for the whole project. Debian ships fmt as a shared library
// only, and deltavm, deltavm-vmm and the kvm tests must link statically (they also run inside
// the nested harness), so fmt's out-of-line functions are compiled here rather than inline in
// every translation unit (FMT_HEADER_ONLY), which tripled the time of every compile.
#include <fmt/format-inl.h>

FMT_BEGIN_NAMESPACE
namespace detail {
// format.h declares these extern; this is where they are instantiated.
template auto thousands_sep_impl<char>(locale_ref) -> thousands_sep_result<char>;
template auto thousands_sep_impl<wchar_t>(locale_ref) -> thousands_sep_result<wchar_t>;
template auto decimal_point_impl(locale_ref) -> char;
template auto decimal_point_impl(locale_ref) -> wchar_t;
}  // namespace detail
FMT_END_NAMESPACE
