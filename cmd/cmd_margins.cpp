// `barrierlm margins`: where a trained model sits relative to its degeneracy boundary (spec
// section 5).  For B sequences it computes, per (sequence b, layer l, head h, position t), the
// stability margin sigma_min(J_t) and log det J_t; then
//   - per layer and head: the distribution over (b, t >= 2): min, quantiles 5/25/50/75/95, mean,
//     count under tau;
//   - token margins m_bt = min over barrier layers and heads (and which layer/head attains it);
//   - support tokens: the K smallest m_bt with their text context, and every m_bt < tau;
//   - sequence margins min_t m_bt.
// Writes margins.json, margins.csv (one row per b,l,h,t), margins_hist.svg (a histogram of
// sigma_min per layer) and margins_strip.html (the text coloured by token margin).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "cmd/cli_checks.h"
#include "cmd/commands.h"
#include "cmd/json.h"
#include "cmd/runs.h"
#include "cmd/svg.h"
#include "cmd/util.h"
#include "core/checkpoint.h"
#include "core/error.h"

namespace fs = std::filesystem;

namespace blm {

namespace {

// The tokens analysed: B sequences of T tokens, row-major [B, T].
struct Sequences {
  int B = 0, T = 0;
  std::vector<int32_t> tokens;
  std::string source;  // for reports
};

// Token margins: [B, T]; NaN at t < 2 (J_t = I there: no margin to speak of).
struct TokenMargins {
  std::vector<double> margin, logdet;
  std::vector<int> layer, head;
};

struct Summary {
  double min = NAN, q05 = NAN, q25 = NAN, q50 = NAN, q75 = NAN, q95 = NAN, mean = NAN;
  int64_t count = 0, under_tau = 0;
};

Summary summarize(std::vector<double> v, double tau) {
  Summary s;
  s.count = static_cast<int64_t>(v.size());
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  s.min = v.front();
  s.q05 = quantile_sorted(v, 0.05);
  s.q25 = quantile_sorted(v, 0.25);
  s.q50 = quantile_sorted(v, 0.50);
  s.q75 = quantile_sorted(v, 0.75);
  s.q95 = quantile_sorted(v, 0.95);
  s.mean = mean_of(v);
  s.under_tau = std::lower_bound(v.begin(), v.end(), tau) - v.begin();
  return s;
}

// Positions past the degeneracy boundary: det J_t <= 0, log det -inf.  sigma_min there measures
// the distance to the boundary from the far side, so a position past it can show a margin that
// looks safe; the count says which heads have crossed.
int64_t past_boundary(const std::vector<double>& logdets) {
  return std::count_if(logdets.begin(), logdets.end(),
                       [](double x) { return std::isinf(x) && x < 0; });
}

void write_summary(JsonWriter& j, const Summary& s, bool with_tau) {
  j.begin_object()
      .kv("min", s.min)
      .kv("q05", s.q05)
      .kv("q25", s.q25)
      .kv("q50", s.q50)
      .kv("q75", s.q75)
      .kv("q95", s.q95)
      .kv("mean", s.mean)
      .kv("count", s.count);
  if (with_tau) j.kv("under_tau", s.under_tau);
  j.end_object();
}

// --sequences asks for more than `source` holds: say so rather than analyse fewer silently.
void note_fewer_sequences(const MarginsOptions& o, int used, const std::string& source, int T) {
  if (used >= o.sequences) return;
  std::fprintf(stderr, "barrierlm: note: --sequences %d capped to %d: %s holds %d sequence%s of %d "
                       "tokens\n",
               o.sequences, used, source.c_str(), used, used == 1 ? "" : "s", T);
}

Sequences sequences_from_text(const MarginsOptions& o, const Tokenizer& tok, int T) {
  Sequences s;
  const std::vector<int32_t> ids = tok.encode(o.text);
  if (ids.size() < 3)
    throw UsageError("--text gives " + std::to_string(ids.size()) +
                     " tokens; margins need at least 3 (positions 0 and 1 have none)");
  if (static_cast<int>(ids.size()) <= T) {
    s.B = 1;
    s.T = static_cast<int>(ids.size());
  } else {
    s.T = T;
    s.B = std::max(1, std::min(o.sequences, static_cast<int>(ids.size() / T)));
    note_fewer_sequences(o, s.B, "the text", T);  // a text of one sequence or less is no cap
  }
  s.tokens.assign(ids.begin(), ids.begin() + static_cast<size_t>(s.B) * s.T);
  s.source = "--text (" + std::to_string(ids.size()) + " tokens";
  if (ids.size() > s.tokens.size())
    s.source += ", first " + std::to_string(s.tokens.size()) + " used";
  s.source += ")";
  return s;
}

Sequences sequences_from_data(const MarginsOptions& o, const TrainedModel& model) {
  const Dataset data = open_model_data(model, o.data);
  const int T = model.checkpoint.config.model.seq_len;
  const int windows = eval_batch_count(*data.val, T, 1);
  Sequences s;
  s.T = T;
  s.B = std::max(1, std::min(o.sequences, windows));
  std::vector<int32_t> targets;
  if (!eval_batch(*data.val, T, s.B, 0, s.tokens, targets))
    throw DataError("the evaluation data holds fewer than seq_len + 1 = " + std::to_string(T + 1) +
                    " tokens");
  s.source = o.data.empty() ? "the run's validation data" : "'" + o.data + "'";
  note_fewer_sequences(o, s.B, s.source, T);
  return s;
}

TokenMargins token_margins(const Margins& m, const BarrierConfig& barrier) {
  TokenMargins tm;
  const size_t n = static_cast<size_t>(m.B) * m.T;
  tm.margin.assign(n, NAN);
  tm.logdet.assign(n, NAN);
  tm.layer.assign(n, -1);
  tm.head.assign(n, -1);
  for (int b = 0; b < m.B; ++b)
    for (int t = 2; t < m.T; ++t) {
      const size_t i = static_cast<size_t>(b) * m.T + t;
      for (int l = 0; l < m.L; ++l) {
        if (!barrier.applies_to(l)) continue;
        for (int h = 0; h < m.H; ++h) {
          const double v = m.at(m.sigma_min, b, l, h, t);
          if (tm.layer[i] < 0 || v < tm.margin[i]) {
            tm.margin[i] = v;
            tm.layer[i] = l;
            tm.head[i] = h;
            tm.logdet[i] = m.at(m.logdet, b, l, h, t);
          }
        }
      }
    }
  return tm;
}

// Display text of each token of one sequence.  A character the byte tokenizer splits over
// several tokens is shown whole at its first token (the others show nothing), so the text reads
// right; malformed bytes show as U+FFFD.
std::vector<std::string> token_texts(const Tokenizer& tok, const int32_t* ids, int T) {
  std::vector<std::string> raw(T), shown(T);
  std::string all;
  std::vector<int> owner;  // byte -> token
  for (int t = 0; t < T; ++t) {
    raw[t] = tok.decode_token(ids[t]);
    all += raw[t];
    owner.insert(owner.end(), raw[t].size(), t);
  }
  for (size_t i = 0; i < all.size();) {
    const size_t len = utf8_char_length(all, i);
    shown[owner[i]] += len ? all.substr(i, len) : std::string("\xEF\xBF\xBD");
    i += len ? len : 1;
  }
  return shown;
}

// The positions (b, t >= 2) ordered by token margin, smallest first.
std::vector<size_t> by_margin(const TokenMargins& tm) {
  std::vector<size_t> order;
  for (size_t i = 0; i < tm.margin.size(); ++i)
    if (!std::isnan(tm.margin[i])) order.push_back(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return tm.margin[a] < tm.margin[b]; });
  return order;
}

std::string context_text(const std::vector<std::string>& texts, int from, int to) {
  std::string s;
  for (int t = std::max(0, from); t < std::min(to, static_cast<int>(texts.size())); ++t) s += texts[t];
  return s;
}

// ------------------------------------------------------------------ outputs

struct Report {
  const MarginsOptions& opts;
  const TrainedModel& model;
  const Sequences& seqs;
  const Margins& m;
  const TokenMargins& tm;
  std::vector<std::vector<std::string>> texts;  // [B][T] display text
  std::vector<size_t> order;                    // positions by margin
};

std::string margins_csv(const Report& r) {
  std::ostringstream o;
  o << "b,l,h,t,token,sigma_min,logdet\n";
  const Margins& m = r.m;
  for (int b = 0; b < m.B; ++b)
    for (int l = 0; l < m.L; ++l)
      for (int h = 0; h < m.H; ++h)
        for (int t = 0; t < m.T; ++t)
          o << b << ',' << l << ',' << h << ',' << t << ','
            << r.seqs.tokens[static_cast<size_t>(b) * m.T + t] << ','
            << format_general(m.at(m.sigma_min, b, l, h, t), 9) << ','
            << format_general(m.at(m.logdet, b, l, h, t), 9) << '\n';
  return o.str();
}

std::vector<double> values_of(const Margins& m, const std::vector<float>& v, int l, int h) {
  std::vector<double> out;
  for (int b = 0; b < m.B; ++b)
    for (int t = 2; t < m.T; ++t) out.push_back(m.at(v, b, l, h, t));
  return out;
}

std::string margins_json(const Report& r) {
  const Margins& m = r.m;
  const Config& cfg = r.model.checkpoint.config;
  const double tau = r.opts.tau;
  JsonWriter j(true);
  j.begin_object()
      .kv("checkpoint", r.model.path)
      .kv("step", r.model.checkpoint.step)
      .kv("source", r.seqs.source)
      .kv("sequences", m.B)
      .kv("seq_len", m.T)
      .kv("n_layer", m.L)
      .kv("n_head", m.H)
      .kv("tau", tau)
      .kv("barrier_lambda", cfg.barrier.lambda);
  j.key("barrier_layers").begin_array();
  for (int l = 0; l < m.L; ++l)
    if (cfg.barrier.applies_to(l)) j.value(l);
  j.end_array();
  j.key("layers").begin_array();
  for (int l = 0; l < m.L; ++l) {
    j.begin_object().kv("layer", l).kv("barrier_layer", cfg.barrier.applies_to(l));
    j.key("heads").begin_array();
    for (int h = 0; h < m.H; ++h) {
      j.begin_object().kv("head", h);
      j.key("sigma_min");
      write_summary(j, summarize(values_of(m, m.sigma_min, l, h), tau), true);
      j.key("logdet");
      const std::vector<double> logdets = values_of(m, m.logdet, l, h);
      write_summary(j, summarize(logdets, -INFINITY), false);
      j.kv("past_boundary", past_boundary(logdets));
      j.end_object();
    }
    j.end_array().end_object();
  }
  j.end_array();

  j.key("token_margins").begin_array();
  for (int b = 0; b < m.B; ++b) {
    std::vector<double> margin(r.tm.margin.begin() + static_cast<size_t>(b) * m.T,
                               r.tm.margin.begin() + static_cast<size_t>(b + 1) * m.T);
    std::vector<double> layer, head;
    for (int t = 0; t < m.T; ++t) {
      const size_t i = static_cast<size_t>(b) * m.T + t;
      layer.push_back(r.tm.layer[i] < 0 ? NAN : r.tm.layer[i]);
      head.push_back(r.tm.head[i] < 0 ? NAN : r.tm.head[i]);
    }
    j.begin_object().kv("sequence", b);
    j.key("margin").numbers(margin);
    j.key("layer").numbers(layer);
    j.key("head").numbers(head);
    j.end_object();
  }
  j.end_array();

  j.key("support_tokens").begin_array();
  for (size_t k = 0; k < r.order.size() && static_cast<int>(k) < r.opts.top; ++k) {
    const size_t i = r.order[k];
    const int b = static_cast<int>(i / m.T), t = static_cast<int>(i % m.T);
    const auto& texts = r.texts[b];
    j.begin_object()
        .kv("rank", static_cast<int64_t>(k + 1))
        .kv("sequence", b)
        .kv("position", t)
        .kv("margin", r.tm.margin[i])
        .kv("layer", r.tm.layer[i])
        .kv("head", r.tm.head[i])
        .kv("logdet", r.tm.logdet[i])
        .kv("token", static_cast<int64_t>(r.seqs.tokens[i]))
        .kv("text", texts[t])
        .kv("before", context_text(texts, t - 32, t))
        .kv("after", context_text(texts, t + 1, t + 9))
        .end_object();
  }
  j.end_array();

  j.key("below_tau").begin_array();
  for (size_t i : r.order) {
    if (!(r.tm.margin[i] < tau)) break;
    j.numbers({double(i / m.T), double(i % m.T), r.tm.margin[i]});
  }
  j.end_array();

  j.key("sequence_margins").begin_array();
  for (int b = 0; b < m.B; ++b) {
    int best = -1;
    for (int t = 2; t < m.T; ++t) {
      const size_t i = static_cast<size_t>(b) * m.T + t;
      if (best < 0 || r.tm.margin[i] < r.tm.margin[static_cast<size_t>(b) * m.T + best]) best = t;
    }
    j.begin_object().kv("sequence", b);
    if (best >= 0)
      j.kv("margin", r.tm.margin[static_cast<size_t>(b) * m.T + best]).kv("position", best);
    else
      j.key("margin").null().key("position").null();
    j.end_object();
  }
  j.end_array().end_object();
  return j.str() + "\n";
}

std::string margins_svg(const Report& r) {
  const Margins& m = r.m;
  // The bins span the data (margins often crowd near 1, far from tau); tau is marked when it
  // falls inside.
  double lo = INFINITY, hi = -INFINITY;
  for (int b = 0; b < m.B; ++b)
    for (int l = 0; l < m.L; ++l)
      for (int h = 0; h < m.H; ++h)
        for (int t = 2; t < m.T; ++t) {
          const double v = m.at(m.sigma_min, b, l, h, t);
          if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
        }
  if (lo > hi) lo = 0, hi = 1;
  const double pad = std::max(0.05 * (hi - lo), 1e-3 * std::max(1.0, std::fabs(hi)));
  lo = std::max(0.0, lo - pad);
  hi += pad;
  const int bins = 40;
  std::vector<double> edges(bins + 1);
  for (int i = 0; i <= bins; ++i) edges[i] = lo + (hi - lo) * i / bins;
  SvgPlot plot;
  plot.title("Stability margins sigma_min(J_t), step " + std::to_string(r.model.checkpoint.step))
      .xlabel("margin sigma_min(J_t)  (0 = degeneracy boundary)")
      .ylabel("count of (sequence, head, position)")
      .x_range(lo, hi);
  for (int l = 0; l < m.L; ++l) {
    std::vector<double> counts(bins, 0);
    for (int h = 0; h < m.H; ++h)
      for (double v : values_of(m, m.sigma_min, l, h)) {
        if (!std::isfinite(v)) continue;
        const int k = std::min(bins - 1, std::max(0, static_cast<int>((v - lo) / (hi - lo) * bins)));
        counts[k] += 1;
      }
    std::string label = "layer " + std::to_string(l);
    if (!r.model.checkpoint.config.barrier.applies_to(l)) label += " (no barrier)";
    plot.histogram(label, edges, counts);
  }
  if (r.opts.tau >= lo && r.opts.tau <= hi)
    plot.vline(r.opts.tau, "tau = " + format_general(r.opts.tau, 3));
  else
    plot.xlabel("margin sigma_min(J_t)  (tau = " + format_general(r.opts.tau, 3) +
                " is off this scale)");
  return plot.render();
}

// Low margin = saturated red, high margin = white; t < 2 grey.
std::string margin_colour(double v, double lo, double hi) {
  if (std::isnan(v)) return "#e0e0e0";
  double c = hi > lo ? (v - lo) / (hi - lo) : 1.0;
  c = std::min(1.0, std::max(0.0, c));
  char buf[48];
  std::snprintf(buf, sizeof buf, "hsl(0, 85%%, %.0f%%)", 55 + 45 * c);
  return buf;
}

std::string margins_html(const Report& r) {
  const Margins& m = r.m;
  // Colour scale: from the smallest margin to the 95th percentile (a few large ones would wash
  // the rest out).
  std::vector<double> sorted;
  for (size_t i : r.order) sorted.push_back(r.tm.margin[i]);
  const double lo = sorted.empty() ? 0 : sorted.front();
  const double hi = sorted.empty() ? 1 : quantile_sorted(sorted, 0.95);
  std::ostringstream o;
  o << "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>barrierlm margins</title>\n"
    << "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto;}"
    << ".seq{font-family:monospace;white-space:pre-wrap;line-height:1.6;border:1px solid #ddd;"
    << "padding:.6em;margin:.5em 0 1.5em 0;}.seq span{border-radius:2px;}"
    << ".bar{display:inline-block;width:16em;height:1em;vertical-align:middle;"
    << "background:linear-gradient(to right," << margin_colour(lo, lo, hi) << ","
    << margin_colour(hi, lo, hi) << ");border:1px solid #aaa;}</style></head><body>\n";
  o << "<h2>Token margins</h2>\n<p>" << html_escape(r.model.path) << ", step "
    << r.model.checkpoint.step << "; " << html_escape(r.seqs.source) << ".<br>"
    << "Each token is coloured by its margin m<sub>t</sub> = min over barrier layers and heads of "
    << "sigma_min(J<sub>t</sub>): " << format_general(lo, 3) << " <span class=\"bar\"></span> "
    << format_general(hi, 3) << " and above (red: the smallest margins of this text, whatever "
    << "their size; the degeneracy boundary is at 0). Grey: "
    << "positions 0 and 1 (no margin). Hover for details.</p>\n";
  for (int b = 0; b < m.B; ++b) {
    const auto& texts = r.texts[b];
    double seq_min = NAN;
    for (int t = 2; t < m.T; ++t) {
      const double v = r.tm.margin[static_cast<size_t>(b) * m.T + t];
      if (std::isnan(seq_min) || v < seq_min) seq_min = v;
    }
    o << "<h3>sequence " << b << ": margin " << format_general(seq_min, 4) << "</h3>\n<div class=\"seq\">";
    for (int t = 0; t < m.T; ++t) {
      const size_t i = static_cast<size_t>(b) * m.T + t;
      std::string title = "t=" + std::to_string(t);
      if (t < 2) title += ": no margin (fewer than two earlier tokens)";
      else
        title += ": margin " + format_general(r.tm.margin[i], 4) + " (layer " +
                 std::to_string(r.tm.layer[i]) + ", head " + std::to_string(r.tm.head[i]) +
                 "), log det " + format_general(r.tm.logdet[i], 4);
      std::string text = texts[t];
      if (text == "\n") text = "\u21b5\n";  // keep line breaks visible and real
      o << "<span style=\"background:" << margin_colour(r.tm.margin[i], lo, hi) << "\" title=\""
        << html_escape(title) << "\">" << html_escape(text) << "</span>";
    }
    o << "</div>\n";
  }
  o << "</body></html>\n";
  return o.str();
}

void print_report(const Report& r, const std::string& out_dir) {
  const Margins& m = r.m;
  const Config& cfg = r.model.checkpoint.config;
  std::printf("barrierlm margins: %s (step %lld), %s: %d sequences x %d tokens\n\n",
              r.model.path.c_str(), static_cast<long long>(r.model.checkpoint.step),
              r.seqs.source.c_str(), m.B, m.T);
  std::printf("layer  head  min       q05       median    q95       mean      < tau   "
              "min logdet  det<=0\n");
  int64_t past_in_barrier = 0;
  for (int l = 0; l < m.L; ++l)
    for (int h = 0; h < m.H; ++h) {
      const Summary s = summarize(values_of(m, m.sigma_min, l, h), r.opts.tau);
      const std::vector<double> logdets = values_of(m, m.logdet, l, h);
      const Summary d = summarize(logdets, -INFINITY);
      const int64_t past = past_boundary(logdets);
      if (cfg.barrier.applies_to(l)) past_in_barrier += past;
      std::printf("%-5d  %-4d  %-8.4f  %-8.4f  %-8.4f  %-8.4f  %-8.4f  %-6lld  %-10s  %lld%s\n", l,
                  h, s.min, s.q05, s.q50, s.q95, s.mean, static_cast<long long>(s.under_tau),
                  format_general(d.min, 4).c_str(), static_cast<long long>(past),
                  cfg.barrier.applies_to(l) ? "" : "  (no barrier)");
    }
  if (past_in_barrier > 0)
    std::printf("\n%lld positions of the barrier layers are past the degeneracy boundary "
                "(det J_t <= 0): their sigma_min is the distance back to it\n",
                static_cast<long long>(past_in_barrier));
  int64_t below = 0;
  for (size_t i : r.order) below += r.tm.margin[i] < r.opts.tau;
  std::printf("\nsupport tokens (smallest token margins; %lld of %zu positions below tau = %g):\n",
              static_cast<long long>(below), r.order.size(), r.opts.tau);
  // The rank, seq and pos columns as wide as their largest values (with thousands of
  // sequences, ranks or positions fixed widths overflowed and pushed the columns right).
  const size_t shown = std::min(r.order.size(), static_cast<size_t>(std::max(r.opts.top, 0)));
  const auto width = [](const char* header, int64_t largest) {
    return std::max(static_cast<int>(std::strlen(header)),
                    static_cast<int>(std::to_string(largest).size()));
  };
  const int rank_width = width("rank", static_cast<int64_t>(shown));
  const int seq_width = width("seq", m.B - 1);
  const int pos_width = width("pos", m.T - 1);
  std::printf("%-*s  margin    layer/head  %-*s  %-*s  context\n", rank_width, "rank", seq_width,
              "seq", pos_width, "pos");
  for (size_t k = 0; k < shown; ++k) {
    const size_t i = r.order[k];
    const int b = static_cast<int>(i / m.T), t = static_cast<int>(i % m.T);
    const std::string ctx = visible_text(context_text(r.texts[b], t - 24, t)) + "[" +
                            visible_text(r.texts[b][t]) + "]" +
                            visible_text(context_text(r.texts[b], t + 1, t + 6));
    // "L11 H3" as one field: with 10 or more layers "L%d H%-6d" pushed the columns right.
    const std::string where =
        "L" + std::to_string(r.tm.layer[i]) + " H" + std::to_string(r.tm.head[i]);
    std::printf("%-*zu  %-8.4f  %-10s  %-*d  %-*d  %s\n", rank_width, k + 1, r.tm.margin[i],
                where.c_str(), seq_width, b, pos_width, t, ctx.c_str());
  }
  std::printf("\nwrote %s/: margins.json, margins.csv, margins_hist.svg, margins_strip.html\n",
              out_dir.c_str());
}

// The margins of every sequence, computed in up to 8 parts of whole sequences (each sequence's
// margins are its own), so that a terminal can show how far it is: for GPT-2 small on a CPU a
// sequence takes tens of seconds.  More parts would cost more than they show: a call has a fixed
// cost (a sequence a call took 14.2 s against 11.4 for 64 sequences of the paper's size on an
// H200, the same values).
Margins margins_of(Backend& backend, const Sequences& seqs) {
  const StatusLine status;
  const int part = (seqs.B + 7) / 8;
  Margins all;
  const std::vector<int32_t> targets(static_cast<size_t>(part) * seqs.T, 0);  // none needed
  for (int b0 = 0; b0 < seqs.B; b0 += part) {
    status.show("margins: sequence " + std::to_string(b0 + 1) + "/" + std::to_string(seqs.B),
                b0, seqs.B);
    const int nb = std::min(part, seqs.B - b0);
    const int32_t* tokens = seqs.tokens.data() + static_cast<size_t>(b0) * seqs.T;
    Margins some = backend.margins(Batch{nb, seqs.T, tokens, targets.data()});
    if (b0 == 0) {
      all = std::move(some);
      all.B = seqs.B;
      continue;
    }
    // [B, L, H, T] with B outermost: these sequences' block follows the earlier ones'.
    all.sigma_min.insert(all.sigma_min.end(), some.sigma_min.begin(), some.sigma_min.end());
    all.logdet.insert(all.logdet.end(), some.logdet.begin(), some.logdet.end());
  }
  status.clear();
  return all;
}

// The files margins writes into its output directory.
const std::vector<std::string>& output_names() {
  static const std::vector<std::string> names = {"margins.json", "margins.csv",
                                                 "margins_hist.svg", "margins_strip.html"};
  return names;
}

// The run's data files as its config names them, read when neither --data nor --text is given
// (margins runs/r --out runs/r/data with data.val runs/r/data/margins.csv).  Relative paths that
// open_model_data finds elsewhere are not covered.
std::vector<NamedFile> run_data_files(const MarginsOptions& o, const Config& cfg) {
  if (!o.data.empty() || o.have_text) return {};
  return {{"the run's validation data", cfg.data.val}, {"the run's training data", cfg.data.train}};
}

// No file written into out_dir replaces a file margins reads: --out m with --data m/margins.csv
// would leave the margins of a text that no longer exists.
void refuse_overwriting(const std::string& out_dir, const std::vector<NamedFile>& inputs) {
  for (const std::string& name : output_names())
    refuse_output_over("--out", join_path(out_dir, name), inputs);
}

}  // namespace

int run_margins(const MarginsOptions& o) {
  if (o.sequences < 1) throw UsageError("--sequences must be at least 1");
  if (o.top < 0) throw UsageError("--top must be >= 0");
  if (!std::isfinite(o.tau)) throw UsageError("--tau must be a number");
  if (o.have_text && !o.data.empty()) throw UsageError("give --data or --text, not both");
  const std::string checkpoint = checkpoint_for(o.model);
  std::string out = o.out;
  if (out.empty()) {
    // Beside the checkpoint, as in its run directory; inside a Hugging Face model's directory.
    const fs::path at(checkpoint);
    const std::string dir = fs::is_directory(at) ? at.string() : at.parent_path().string();
    out = join_path(dir.empty() ? "." : dir, "margins");
  }
  check_output_dir(out, "output directory");  // before the margins are computed, not after
  refuse_overwriting(out, model_input_files(checkpoint, o.data));
  TrainedModel model = load_trained_model(checkpoint, o.model.backend, o.model.threads);
  refuse_overwriting(out, run_data_files(o, model.checkpoint.config));  // the checkpoint names them
  const int T = model.checkpoint.config.model.seq_len;
  const Sequences seqs =
      o.have_text ? sequences_from_text(o, *model.tokenizer, T) : sequences_from_data(o, model);
  const Margins m = margins_of(*model.backend, seqs);
  const TokenMargins tm = token_margins(m, model.checkpoint.config.barrier);

  Report r{o, model, seqs, m, tm, {}, by_margin(tm)};
  for (int b = 0; b < seqs.B; ++b)
    r.texts.push_back(token_texts(*model.tokenizer, seqs.tokens.data() + static_cast<size_t>(b) * seqs.T, seqs.T));

  // Render everything first so a failure leaves no partial set of files.
  const std::string contents[] = {margins_json(r), margins_csv(r), margins_svg(r),
                                  margins_html(r)};  // in output_names()'s order
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) throw Error("cannot create output directory '" + out + "': " + ec.message());
  for (size_t i = 0; i < output_names().size(); ++i)
    write_file_atomic(join_path(out, output_names()[i]), contents[i]);
  print_report(r, out);
  return 0;
}

}  // namespace blm
