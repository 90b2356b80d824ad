// The service's metrics, rendered in the Prometheus text exposition format (version 0.0.4):
// counters and gauges by label values, and histograms with fixed buckets. Label values come
// from bounded sets (template names, backends, error codes), never from VM ids.
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace deltavm {

class Metrics {
 public:
  using Labels = std::vector<std::pair<std::string, std::string>>;

  // Declares a family: its HELP text and TYPE ("counter", "gauge"), or a histogram with the
  // upper bounds of its buckets. Declaring again changes nothing.
  void declare(const std::string& name, const std::string& type, const std::string& help);
  void declare_histogram(const std::string& name, const std::string& help, std::vector<double> bounds);

  void add(const std::string& name, const Labels& labels, double amount = 1);
  void set(const std::string& name, const Labels& labels, double value);
  void observe(const std::string& name, const Labels& labels, double value);
  // Drops every series of a gauge (before setting the current ones).
  void clear(const std::string& name);

  std::string render() const;

 private:
  struct Histogram {
    std::vector<uint64_t> counts;  // One per bound, not cumulative.
    uint64_t count = 0;
    double sum = 0;
  };
  struct Family {
    std::string type, help;
    std::vector<double> bounds;
    std::map<Labels, double> values;
    std::map<Labels, Histogram> histograms;
  };

  mutable std::mutex mutex_;
  std::map<std::string, Family> families_;
};

}  // namespace deltavm
