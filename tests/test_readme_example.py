"""The README's own-training-loop example runs as written (kept in sync by hand; keep it 20 lines)."""


def test_readme_p_kl_step():
    import torch, xtoken
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    from xtoken.align import align_batch
    from xtoken.losses import p_kl_loss
    from xtoken.projection import build_projection

    s_tok, t_tok = xtoken.load_tokenizer("meta-llama/Llama-3.2-1B"), xtoken.load_tokenizer("Qwen/Qwen3-4B")
    s_tok.pad_token = "<|finetune_right_pad_id|>"
    W = build_projection(s_tok, t_tok)      # once (or Projection.load("results/W_...safetensors", s_tok, t_tok))
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=128256, **tiny))          # your student
    teacher = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, head_dim=16, **tiny)).eval()   # your teacher
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    texts = ["In 2024, 201 apples cost $3.50.", "Hundreds of people came."]
    s = s_tok(texts, return_tensors="pt", padding=True)
    t = t_tok(texts, return_tensors="pt", padding=True)
    alignments = align_batch(s.input_ids, t.input_ids, s_tok, t_tok, student_mask=s.attention_mask, teacher_mask=t.attention_mask)
    out = student(**s, labels=s.input_ids.masked_fill(s.attention_mask == 0, -100))
    with torch.no_grad():
        t_logits = teacher(**t).logits
    kd, metrics = p_kl_loss(out.logits, t_logits, alignments, W)
    (out.loss + xtoken.losses.dynamic_kd_scale(out.loss, kd)).backward()
    opt.step()
    assert torch.isfinite(kd) and kd > 0
    assert 0 < metrics["n_chunks"] and 0 <= metrics["mass_lost_empty_rows"] < 0.1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
