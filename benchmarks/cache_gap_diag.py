"""Training-free diagnostic: how far is each cache reconstruction from the live teacher, and how far is the
KD gradient w.r.t. the student's logits (T = 1, fkl, the bench's loss) from the live one?"""

import glob

import torch

from sakd.data import load_text_dataset, text_stream
from sakd.losses.sparse import SparseTeacher, sample_teacher, sparse_per_position, topk_teacher
from sakd.models import load_model, load_tokenizer
from sakd.teacher.cache.manifest import read_manifest
from sakd.teacher.cache.reader import CacheReader

torch.manual_seed(0)
G = "/tmp/i23g/grid"
tok = load_tokenizer(f"{G}/data/tokenizer-v1024")
teacher = load_model(f"{G}/teacher/final", tokenizer=tok).eval()
students = {"init": load_model("tiny-dense", tokenizer=tok).eval()}
for d in sorted(glob.glob("/tmp/s2cg/keep/*/final")):
    students[d.split("/")[-2]] = load_model(d, tokenizer=tok).eval()
root = glob.glob(f"{G}/caches/cache_topk_tail_k64*")[0]
r = CacheReader(root, read_manifest(root))
blocks = {
    "train": torch.stack([r.block(i).token_ids for i in range(16)]),
    "heldout": text_stream(load_text_dataset(f"{G}/data/validation.jsonl"), tok)
    .ids[: 16 * 128]
    .reshape(16, 128),
}
V = 1024


def flatcos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm())), float((a - b).norm() / b.norm())


with torch.no_grad():
    for split, ids in blocks.items():
        tl = teacher(input_ids=ids).logits.reshape(-1, V).float()
        p = tl.log_softmax(-1)
        ent = -(p.exp() * p).sum(-1).mean()
        print(f"== {split}: {ids.numel()} positions, teacher entropy {ent:.3f} nats")
        for k in (16, 64, 128, 256):
            st = topk_teacher(tl, k)
            tail = st.tail_logprob.exp()
            print(
                f"  k{k}: tail mass mean {tail.mean():.4f} median {tail.median():.2e} p90 {tail.quantile(0.9):.4f}"
            )
        for sname, model in students.items():
            z = model(input_ids=ids).logits.reshape(-1, V).float()
            q = z.softmax(-1)
            g_live = q - p.exp()
            print(f"  student {sname}: KL(p||q) {(p.exp() * (p - q.log())).sum(-1).mean():.4f}")

            def grad(teach, mode, z=z):
                zz = z.clone().requires_grad_(True)
                with torch.enable_grad():
                    sparse_per_position(zz, teach, mode).sum().backward()
                return zz.grad

            rows = []
            for k in (16, 64, 128, 256):
                for dt in (torch.float16, torch.float32):
                    st = topk_teacher(tl, k)
                    st = SparseTeacher(
                        st.indices, st.logprobs.to(dt).float(), 1.0, tail_logprob=st.tail_logprob
                    )
                    rows.append((f"topk_tail k{k} {str(dt)[6:]}", grad(st, "topk_tail")))
                # tail spread uniformly over the other ids (a dense reconstruction): gradient q - p_hat
                st = topk_teacher(tl, k)
                ph = (st.tail_logprob.exp() / (V - k)).unsqueeze(-1).expand(-1, V).clone()
                ph.scatter_(-1, st.indices, st.logprobs.exp())
                kl = (p.exp() * (p - ph.log())).sum(-1).mean()
                rows.append((f"topk+uniform-tail k{k} [KL(p||p^) {kl:.4f}]", q - ph))
                # top-k + n draws from the tail (renormalised), each draw worth tail/n
                n = 16
                tail_lp = p.scatter(-1, st.indices, float("-inf"))
                draws = torch.multinomial(tail_lp.softmax(-1), n, replacement=True)
                ph2 = torch.zeros_like(ph).scatter_add_(
                    -1, draws, (st.tail_logprob.exp() / n).unsqueeze(-1).expand(-1, n).contiguous()
                )
                ph2.scatter_(-1, st.indices, st.logprobs.exp())
                rows.append((f"topk k{k}+{n} tail draws", q - ph2))
            for n in (16, 64, 256):
                rows.append((f"sampled n{n}", grad(sample_teacher(tl, n), "sampled")))
            for name, g in rows:
                c, e = flatcos(g, g_live)
                # component of the error outside the top-64 ids
                print(f"    {name:45s} cos {c:.4f}  |g-g_live|/|g_live| {e:.4f}")
