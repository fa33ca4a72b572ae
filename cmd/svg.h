// A small SVG plot writer: one panel with axes, "nice" ticks, grid, axis labels, title and a
// legend, holding line series, histogram outlines and vertical markers.  Used by `margins`
// (margins_hist.svg) and meant for a later `report` command (loss curves, noise sweeps).
//
//   SvgPlot p;
//   p.title("Stability margins").xlabel("sigma_min").ylabel("count");
//   p.histogram("layer 0", edges, counts);   // edges: n + 1 bin edges, counts: n
//   p.line("val CE", steps, ce);             // x, y of equal length; non-finite points break it
//   p.vline(0.25, "tau");
//   write_file_atomic("plot.svg", p.render());
#pragma once
#include <string>
#include <vector>

namespace blm {

// About max_ticks (at least 2) round values (1, 2 or 5 times a power of ten) spanning [lo, hi].
std::vector<double> nice_ticks(double lo, double hi, int max_ticks);
// Tick label text with as many decimals as the tick spacing needs.
std::string tick_label(double value, double spacing);
// The i-th colour of a qualitative palette (cycles).
std::string series_color(int i);

class SvgPlot {
 public:
  SvgPlot(int width = 760, int height = 460) : width_(width), height_(height) {}

  SvgPlot& title(const std::string& t) { title_ = t; return *this; }
  SvgPlot& xlabel(const std::string& t) { xlabel_ = t; return *this; }
  SvgPlot& ylabel(const std::string& t) { ylabel_ = t; return *this; }
  // Fixed axis ranges; by default they come from the data (and include 0 on y for histograms).
  SvgPlot& x_range(double lo, double hi) { x_fixed_ = true; xlo_ = lo; xhi_ = hi; return *this; }
  SvgPlot& y_range(double lo, double hi) { y_fixed_ = true; ylo_ = lo; yhi_ = hi; return *this; }

  // A polyline through (x[i], y[i]).  color "" takes the next palette colour.
  SvgPlot& line(const std::string& label, const std::vector<double>& x,
                const std::vector<double>& y, const std::string& color = "");
  // The same with a dot at each point (sparse series: a lone point draws no line).
  SvgPlot& dotted_line(const std::string& label, const std::vector<double>& x,
                       const std::vector<double>& y, const std::string& color = "");
  // The same dashed and thinner (a range around another series).
  SvgPlot& dashed_line(const std::string& label, const std::vector<double>& x,
                       const std::vector<double>& y, const std::string& color = "");
  // A histogram outline: counts[i] over [edges[i], edges[i+1]).
  SvgPlot& histogram(const std::string& label, const std::vector<double>& edges,
                     const std::vector<double>& counts, const std::string& color = "");
  // A dashed vertical marker at x, named in the legend.
  SvgPlot& vline(double x, const std::string& label, const std::string& color = "#555555");

  // The whole SVG document.  Throws blm::Error when a series is malformed (sizes disagree).
  std::string render() const;

 private:
  struct Series {
    std::string label, color;
    std::vector<double> x, y;  // for histograms: the outline's corner points
    bool dashed = false;       // thinner, dashed (vlines and dashed_line)
    bool vertical = false;     // a vline: x[0] only
    bool dots = false;         // a dot at each point
  };
  SvgPlot& add_line(const std::string& label, const std::vector<double>& x,
                    const std::vector<double>& y, const std::string& color, bool dashed,
                    bool dots);
  void data_ranges(double& xlo, double& xhi, double& ylo, double& yhi) const;
  // Whether the legend goes top left: the data reach higher in the right third than the left.
  bool legend_on_left(double xlo, double xhi, double ylo, double yhi) const;
  std::string next_color() const { return series_color(static_cast<int>(series_.size())); }

  int width_, height_;
  std::string title_, xlabel_, ylabel_;
  bool x_fixed_ = false, y_fixed_ = false, y_from_zero_ = false;
  double xlo_ = 0, xhi_ = 1, ylo_ = 0, yhi_ = 1;
  std::vector<Series> series_;
};

}  // namespace blm
