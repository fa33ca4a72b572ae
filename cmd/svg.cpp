// The SVG plot writer of svg.h: maps data to pixels, draws grid, axes, ticks, series and legend.
#include "cmd/svg.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "cmd/util.h"
#include "core/error.h"

namespace blm {

namespace {

// Plot area margins in pixels (room for tick labels, axis labels, title).
constexpr double kLeft = 72, kRight = 24, kTop = 44, kBottom = 58;

std::string px(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

// Widens an empty or inverted range so the mapping below never divides by zero.
void widen(double& lo, double& hi) {
  if (!(hi > lo)) {
    const double pad = lo == 0 ? 0.5 : std::fabs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
}

}  // namespace

std::vector<double> nice_ticks(double lo, double hi, int max_ticks) {
  std::vector<double> ticks;
  if (!std::isfinite(lo) || !std::isfinite(hi)) return ticks;
  widen(lo, hi);
  max_ticks = std::max(max_ticks, 2);
  const double raw = (hi - lo) / (max_ticks - 1);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    step = m * mag;
    if (step >= raw) break;
  }
  // Ticks are k * step for whole k, snapped to 12 significant digits so 3 * 0.2 is 0.6.
  const double k0 = std::ceil(lo / step - 1e-9), k1 = std::floor(hi / step + 1e-9);
  for (double k = k0; k <= k1; ++k) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.12g", k * step);
    ticks.push_back(k == 0 ? 0.0 : std::strtod(buf, nullptr));
  }
  return ticks;
}

std::string tick_label(double value, double spacing) {
  char buf[32];
  if (spacing <= 0 || !std::isfinite(spacing)) spacing = 1;
  const double a = std::max(std::fabs(value), spacing);
  if (a >= 1e6 || a < 1e-4) {
    std::snprintf(buf, sizeof buf, "%.3g", value);
  } else {
    const int decimals = std::max(0, static_cast<int>(std::ceil(-std::log10(spacing) - 1e-9)));
    std::snprintf(buf, sizeof buf, "%.*f", decimals, value);
  }
  return buf;
}

std::string series_color(int i) {
  static const char* palette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  return palette[((i % 10) + 10) % 10];
}

SvgPlot& SvgPlot::add_line(const std::string& label, const std::vector<double>& x,
                           const std::vector<double>& y, const std::string& color, bool dashed,
                           bool dots) {
  if (x.size() != y.size())
    throw Error("plot series '" + label + "': " + std::to_string(x.size()) + " x values but " +
                std::to_string(y.size()) + " y values");
  Series s{label, color.empty() ? next_color() : color, x, y, dashed, false};
  s.dots = dots;
  series_.push_back(std::move(s));
  return *this;
}

SvgPlot& SvgPlot::line(const std::string& label, const std::vector<double>& x,
                       const std::vector<double>& y, const std::string& color) {
  return add_line(label, x, y, color, false, false);
}

SvgPlot& SvgPlot::dotted_line(const std::string& label, const std::vector<double>& x,
                              const std::vector<double>& y, const std::string& color) {
  return add_line(label, x, y, color, false, true);
}

SvgPlot& SvgPlot::dashed_line(const std::string& label, const std::vector<double>& x,
                              const std::vector<double>& y, const std::string& color) {
  return add_line(label, x, y, color, true, false);
}

SvgPlot& SvgPlot::histogram(const std::string& label, const std::vector<double>& edges,
                            const std::vector<double>& counts, const std::string& color) {
  if (edges.size() != counts.size() + 1)
    throw Error("plot histogram '" + label + "': " + std::to_string(edges.size()) +
                " edges for " + std::to_string(counts.size()) + " bins (need bins + 1)");
  Series s{label, color.empty() ? next_color() : color, {}, {}, false, false};
  // Outline: up at the first edge, across each bin, down at the last edge.
  if (!counts.empty()) {
    s.x.push_back(edges.front());
    s.y.push_back(0);
    for (size_t i = 0; i < counts.size(); ++i) {
      s.x.push_back(edges[i]);
      s.y.push_back(counts[i]);
      s.x.push_back(edges[i + 1]);
      s.y.push_back(counts[i]);
    }
    s.x.push_back(edges.back());
    s.y.push_back(0);
  }
  series_.push_back(std::move(s));
  y_from_zero_ = true;
  return *this;
}

SvgPlot& SvgPlot::vline(double x, const std::string& label, const std::string& color) {
  series_.push_back({label, color, {x}, {}, true, true});
  return *this;
}

void SvgPlot::data_ranges(double& xlo, double& xhi, double& ylo, double& yhi) const {
  xlo = ylo = INFINITY;
  xhi = yhi = -INFINITY;
  for (const Series& s : series_) {
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i])) continue;
      if (!s.vertical && !std::isfinite(s.y[i])) continue;
      xlo = std::min(xlo, s.x[i]);
      xhi = std::max(xhi, s.x[i]);
      if (s.vertical) continue;
      ylo = std::min(ylo, s.y[i]);
      yhi = std::max(yhi, s.y[i]);
    }
  }
  if (xlo > xhi) xlo = 0, xhi = 1;
  if (ylo > yhi) ylo = 0, yhi = 1;
  if (y_from_zero_) ylo = std::min(ylo, 0.0), yhi = std::max(yhi, 0.0);
  if (x_fixed_) xlo = xlo_, xhi = xhi_;
  if (y_fixed_) ylo = ylo_, yhi = yhi_;
  widen(xlo, xhi);
  widen(ylo, yhi);
  if (!y_fixed_ && !y_from_zero_) {  // a little headroom so lines do not touch the frame
    const double pad = 0.04 * (yhi - ylo);
    ylo -= pad;
    yhi += pad;
  } else if (!y_fixed_) {
    yhi += 0.04 * (yhi - ylo);
  }
}

bool SvgPlot::legend_on_left(double xlo, double xhi, double ylo, double yhi) const {
  // Highest point (as a fraction of the y range) in the left and right third of the x range.
  double left = 0, right = 0;
  for (const Series& s : series_) {
    if (s.vertical) continue;
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      const double fx = (s.x[i] - xlo) / (xhi - xlo), fy = (s.y[i] - ylo) / (yhi - ylo);
      if (fx <= 1.0 / 3) left = std::max(left, fy);
      if (fx >= 2.0 / 3) right = std::max(right, fy);
    }
  }
  return right > left;
}

std::string SvgPlot::render() const {
  double xlo, xhi, ylo, yhi;
  data_ranges(xlo, xhi, ylo, yhi);
  const double pw = width_ - kLeft - kRight, ph = height_ - kTop - kBottom;
  const auto X = [&](double x) { return kLeft + (x - xlo) / (xhi - xlo) * pw; };
  const auto Y = [&](double y) { return kTop + (1 - (y - ylo) / (yhi - ylo)) * ph; };
  const auto inside_x = [&](double x) { return x >= xlo - 1e-12 && x <= xhi + 1e-12; };

  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width_ << "\" height=\"" << height_
    << "\" viewBox=\"0 0 " << width_ << " " << height_
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n";
  o << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  if (!title_.empty())
    o << "<text x=\"" << px(width_ / 2.0) << "\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">"
      << html_escape(title_) << "</text>\n";

  // Grid and tick labels.
  const std::vector<double> xt = nice_ticks(xlo, xhi, 8), yt = nice_ticks(ylo, yhi, 6);
  const double xs = xt.size() > 1 ? xt[1] - xt[0] : 1, ys = yt.size() > 1 ? yt[1] - yt[0] : 1;
  o << "<g stroke=\"#e4e4e4\" stroke-width=\"1\">\n";
  for (double t : xt)
    o << "<line x1=\"" << px(X(t)) << "\" y1=\"" << px(kTop) << "\" x2=\"" << px(X(t))
      << "\" y2=\"" << px(kTop + ph) << "\"/>\n";
  for (double t : yt)
    o << "<line x1=\"" << px(kLeft) << "\" y1=\"" << px(Y(t)) << "\" x2=\"" << px(kLeft + pw)
      << "\" y2=\"" << px(Y(t)) << "\"/>\n";
  o << "</g>\n<g fill=\"#333333\">\n";
  for (double t : xt)
    o << "<text x=\"" << px(X(t)) << "\" y=\"" << px(kTop + ph + 17)
      << "\" text-anchor=\"middle\">" << tick_label(t, xs) << "</text>\n";
  for (double t : yt)
    o << "<text x=\"" << px(kLeft - 6) << "\" y=\"" << px(Y(t) + 4) << "\" text-anchor=\"end\">"
      << tick_label(t, ys) << "</text>\n";
  o << "</g>\n";
  o << "<rect x=\"" << px(kLeft) << "\" y=\"" << px(kTop) << "\" width=\"" << px(pw)
    << "\" height=\"" << px(ph) << "\" fill=\"none\" stroke=\"#333333\"/>\n";
  if (!xlabel_.empty())
    o << "<text x=\"" << px(kLeft + pw / 2) << "\" y=\"" << px(height_ - 14.0)
      << "\" text-anchor=\"middle\">" << html_escape(xlabel_) << "</text>\n";
  if (!ylabel_.empty())
    o << "<text transform=\"translate(18," << px(kTop + ph / 2)
      << ") rotate(-90)\" text-anchor=\"middle\">" << html_escape(ylabel_) << "</text>\n";

  // Series, clipped to the plot area.
  o << "<clipPath id=\"plot-area\"><rect x=\"" << px(kLeft) << "\" y=\"" << px(kTop)
    << "\" width=\"" << px(pw) << "\" height=\"" << px(ph) << "\"/></clipPath>\n";
  o << "<g clip-path=\"url(#plot-area)\" fill=\"none\" stroke-width=\"1.8\">\n";
  for (const Series& s : series_) {
    if (s.vertical) {
      if (!std::isfinite(s.x[0]) || !inside_x(s.x[0])) continue;
      o << "<line x1=\"" << px(X(s.x[0])) << "\" y1=\"" << px(kTop) << "\" x2=\""
        << px(X(s.x[0])) << "\" y2=\"" << px(kTop + ph) << "\" stroke=\"" << s.color
        << "\" stroke-dasharray=\"6 4\"/>\n";
      continue;
    }
    // Non-finite points split the series into separate polylines.
    std::string points;
    const auto flush = [&]() {
      if (!points.empty())
        o << "<polyline stroke=\"" << s.color << "\""
          << (s.dashed ? " stroke-width=\"1.2\" stroke-dasharray=\"5 3\"" : "") << " points=\""
          << points << "\"/>\n";
      points.clear();
    };
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) {
        flush();
        continue;
      }
      points += (points.empty() ? "" : " ") + px(X(s.x[i])) + "," + px(Y(s.y[i]));
    }
    flush();
    if (s.dots)
      for (size_t i = 0; i < s.x.size(); ++i)
        if (std::isfinite(s.x[i]) && std::isfinite(s.y[i]))
          o << "<circle cx=\"" << px(X(s.x[i])) << "\" cy=\"" << px(Y(s.y[i]))
            << "\" r=\"3\" fill=\"" << s.color << "\" stroke=\"none\"/>\n";
  }
  o << "</g>\n";

  // Legend in the top corner the data leave emptier, on a translucent box.
  int rows = 0;
  for (const Series& s : series_) rows += s.label.empty() ? 0 : 1;
  if (rows > 0) {
    const double box_x = legend_on_left(xlo, xhi, ylo, yhi) ? kLeft + 4 : kLeft + pw - 158;
    o << "<rect x=\"" << px(box_x) << "\" y=\"" << px(kTop + 2) << "\" width=\"154\" "
      << "height=\"" << px(17.0 * rows + 6) << "\" fill=\"white\" fill-opacity=\"0.85\" "
      << "stroke=\"#cccccc\"/>\n";
    int row = 0;
    for (const Series& s : series_) {
      if (s.label.empty()) continue;
      const double y = kTop + 14 + 17.0 * row++;
      const double x = box_x + 8;
      o << "<line x1=\"" << px(x) << "\" y1=\"" << px(y - 4) << "\" x2=\"" << px(x + 22)
        << "\" y2=\"" << px(y - 4) << "\" stroke=\"" << s.color << "\" stroke-width=\"2.5\""
        << (s.dashed ? " stroke-dasharray=\"6 4\"" : "") << "/>\n";
      o << "<text x=\"" << px(x + 28) << "\" y=\"" << px(y) << "\">" << html_escape(s.label)
        << "</text>\n";
    }
  }
  o << "</svg>\n";
  return o.str();
}

}  // namespace blm
