// The step loops of VisPruner's duplicate removal and DivPrune's greedy max-min, one call per
// batch. Built and loaded by _native.py; each function mirrors the eager code it replaces (named
// below) and reads the same float32 similarity, so it returns the same tokens. No float
// arithmetic happens here, only comparisons: compiler flags cannot change a result.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace {

struct Scored {
    float value;
    int64_t index;
};

// torch's CPU sort (float32, descending=True, stable=False) calls std::sort with this comparator
// (KeyValueCompDesc in aten/src/ATen/native/cpu/SortingKernel.cpp), so with the same standard
// library, tied values come out in the same order. _native.py checks that before using this file.
bool descending(const Scored& a, const Scored& b) {
    return (std::isnan(a.value) && !std::isnan(b.value)) || a.value > b.value;
}

void sort_descending(std::vector<Scored>& items, int64_t count) {
    std::sort(items.begin(), items.begin() + count, descending);
}

// Similar tokens listed per token (as vispruner.PARTNERS).
constexpr int64_t PARTNERS = 16;

// For each token of `members` (size m), its `count` most similar other members by descending
// similarity (a row of `matrix`, length x length), into `table` at the token's row; count < m.
// Which of tied tokens is listed does not matter: a member not listed is no more similar than
// the last one listed.
void list_partners(const float* matrix, int64_t length, const std::vector<int64_t>& members, int64_t m,
                   int64_t count, std::vector<Scored>& table) {
    for (int64_t i = 0; i < m; ++i) {
        const int64_t token = members[i];
        const float* row = matrix + token * length;
        Scored* best = table.data() + token * count;
        int64_t filled = 0;
        for (int64_t j = 0; j < m; ++j) {
            const int64_t other = members[j];
            const float value = row[other];
            if (other == token || (filled == count && !(value > best[count - 1].value))) continue;
            // Insert into the descending list, dropping its last entry when full.
            int64_t at = filled < count ? filled++ : count - 1;
            while (at > 0 && value > best[at - 1].value) {
                best[at] = best[at - 1];
                --at;
            }
            best[at] = {value, other};
        }
    }
}

}  // namespace

extern "C" {

// out (n,) = torch.argsort(values (n,), descending=True) on the CPU, for the check in _native.py.
void vp_argsort_descending(const float* values, int64_t n, int64_t* out) {
    std::vector<Scored> items(n);
    for (int64_t i = 0; i < n; ++i) items[i] = {values[i], i};
    sort_descending(items, n);
    for (int64_t i = 0; i < n; ++i) out[i] = items[i].index;
}

// VisPruner's duplicate removal (vispruner._remove_duplicates and _step), for `batch` images.
//   similarity (batch, length, length): residual_similarity of the residual tokens, listed in
//       descending attention; its diagonal is never read.
//   out (batch, budget): positions of the surviving tokens, in the order of the final list;
//       0 <= budget < length.
// Each step: A = even positions of the list, B = odd; each token of A scores its highest
// similarity to B (0 when B is empty); the min(8, size - budget, |A|) highest-scoring tokens of A
// are dropped; the next list is the rest of A in descending score, then B. A token's highest
// similarity to B is that of its first partner in B (its most similar listed tokens, listed
// again whenever the list halves); a token with no partner in B scans B.
void vp_remove_duplicates(const float* similarity, int64_t batch, int64_t length, int64_t budget, int64_t* out) {
    std::vector<Scored> partners(length * PARTNERS);
    std::vector<int64_t> list(length), next(length);
    std::vector<char> in_b(length, 0);
    std::vector<Scored> side_a((length + 1) / 2);
    for (int64_t image = 0; image < batch; ++image) {
        const float* matrix = similarity + image * length * length;
        std::iota(list.begin(), list.end(), 0);
        int64_t size = length, members = 0, count = 0;
        while (size > budget) {
            if (members == 0 || 2 * size <= members) {
                // Partners among the tokens still listed (again whenever the list halves), so that
                // most of a token's partners are still listed.
                members = size;
                count = std::min<int64_t>(PARTNERS, members - 1);
                list_partners(matrix, length, list, members, count, partners);
            }
            const int64_t size_a = (size + 1) / 2, size_b = size / 2;
            const int64_t drop = std::min<int64_t>({8, size - budget, size_a});
            for (int64_t j = 0; j < size_b; ++j) in_b[list[2 * j + 1]] = 1;
            for (int64_t i = 0; i < size_a; ++i) {
                const int64_t token = list[2 * i];
                float closeness = 0.0f;
                if (size_b > 0) {
                    const Scored* listed = partners.data() + token * count;
                    int64_t probe = 0;
                    while (probe < count && !in_b[listed[probe].index]) ++probe;
                    if (probe < count) {
                        closeness = listed[probe].value;
                    } else {
                        const float* row = matrix + token * length;
                        closeness = -INFINITY;
                        for (int64_t j = 0; j < size_b; ++j) closeness = std::max(closeness, row[list[2 * j + 1]]);
                    }
                }
                side_a[i] = {closeness, i};
            }
            sort_descending(side_a, size_a);
            int64_t filled = 0;
            for (int64_t i = drop; i < size_a; ++i) next[filled++] = list[2 * side_a[i].index];
            for (int64_t j = 0; j < size_b; ++j) {
                next[filled++] = list[2 * j + 1];
                in_b[list[2 * j + 1]] = 0;
            }
            list.swap(next);
            size = filled;
        }
        std::copy(list.begin(), list.begin() + budget, out + image * budget);
    }
}

// DivPrune's greedy max-min (divprune.divprune_selection), for `batch` images.
//   similarity (batch, n, n) with a -inf diagonal; first (batch,): the first token chosen;
//   keep (batch, n) bool, all false on entry: `count` tokens chosen on return.
// Each next token is the unchosen one whose highest similarity to a chosen token is lowest; of
// tied ones the lowest index, as torch.argmin picks.
void vp_greedy_max_min(const float* similarity, const int64_t* first, int64_t batch, int64_t n, int64_t count,
                       bool* keep) {
    std::vector<float> nearest(n);
    for (int64_t image = 0; image < batch; ++image) {
        const float* matrix = similarity + image * n * n;
        bool* chosen = keep + image * n;
        int64_t pick = first[image];
        std::copy(matrix + pick * n, matrix + (pick + 1) * n, nearest.begin());
        chosen[pick] = true;
        for (int64_t step = 1; step < count; ++step) {
            float lowest = INFINITY;
            pick = -1;
            for (int64_t j = 0; j < n; ++j) {
                if (!chosen[j] && (pick < 0 || nearest[j] < lowest)) {
                    lowest = nearest[j];
                    pick = j;
                }
            }
            chosen[pick] = true;
            const float* row = matrix + pick * n;
            for (int64_t j = 0; j < n; ++j) nearest[j] = std::max(nearest[j], row[j]);
        }
    }
}

}  // extern "C"
