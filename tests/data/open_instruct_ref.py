"""An independent oracle: open-instruct's data code, re-implemented from reading it (not importing
qtulu), for the parity tests. Each function names the file and commit it follows; randomness goes
through a ``random.Random`` passed in, consumed exactly as the reference consumes the global
``random`` after ``random.seed(seed)``.

References (allenai/open-instruct):
- open_instruct/instruction_encode_templates.py @ e44fcf588 (June 2023 release)
- open_instruct/reformat_datasets.py @ e44fcf588; OASST1 changes @ 853377e82, 94055552c, 503407ee8
- scripts/split_sharegpt_conversations.py @ e44fcf588; scripts/resample_flan_v2.py @ e44fcf588
- open_instruct/finetune.py encode_with_messages_format @ e44fcf588, with the tokenizer set-up of
  scripts/finetune_with_accelerate.sh (--use_slow_tokenizer) and finetune.py's add_special_tokens.
"""

from __future__ import annotations

import random

# instruction_encode_templates.py @ e44fcf588: (prompt, completion, weight), typed from the file
W_INPUT = [
    ("{instruction}\n\n{input}\n\n", "{output}", 0.2),
    ("{instruction}\n{input}\n\n", "{output}", 0.1),
    ("{instruction}\n{input}\n", "{output}", 0.1),
    ("{instruction}\n\nInput: {input}\n\nOutput:", "{output}", 0.05),
    ("{instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("{instruction}\n{input}\n\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAdditional Context:\n{input}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\n", "{output}", 0.05),
    ("Task: {instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("You need to complete the following task:\n\n{instruction}\n\n{input}\n\nAnswer:", "{output}", 0.05),
    ("{instruction}\n\nNow complete the following instance -\nInput: {input}\nOutput:", "{output}", 0.05),
    ("Instruction:{instruction}\n\nInput: {input}\n\n", "{output}", 0.05),
    ("Below is an instruction that describes a task, paired with an input that provides further context. Write a "
     "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
     "### Response:", "{output}", 0.1),
]
WO_INPUT = [
    ("{instruction}\n\n", "{output}", 0.2),
    ("{instruction}\n", "{output}", 0.1),
    ("{instruction}", "\n{output}", 0.1),
    ("{instruction} Output:", "{output}", 0.05),
    ("{instruction}\nResponse:", "{output}", 0.05),
    ("{instruction}\n\nAnswer:", "{output}", 0.05),
    ("Task: {instruction}\n\n", "{output}", 0.05),
    ("Instruction: {instruction}\n", "{output}", 0.05),
    ("Instruction: {instruction}\nOutput:", "{output}", 0.05),
    ("You need to complete the following task:\n\n{instruction}\n\n", "{output}", 0.05),
    ("Can you help with this?\n\n{instruction}\n", "{output}", 0.05),
    ("Plase answer the following request: {instruction}\nAnswer:", "{output}", 0.05),
    ("Tell me how would you respond to the following request.\n{instruction}\n", "{output}", 0.05),
    ("Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:",
     "{output}", 0.1),
]


def encode_instruction_example(instruction, input, output, rnd, random_template=True):
    """instruction_encode_templates.py @ e44fcf588 (eos_token=None)."""
    if random_template:
        if input is not None and input.strip() != "":
            p, c, _ = rnd.choices(W_INPUT, weights=[w for _, _, w in W_INPUT])[0]
            return {"prompt": p.format(instruction=instruction.strip(), input=input.strip()),
                    "completion": c.format(output=output.strip())}
        p, c, _ = rnd.choices(WO_INPUT, weights=[w for _, _, w in WO_INPUT])[0]
        return {"prompt": p.format(instruction=instruction.strip()), "completion": c.format(output=output.strip())}
    if input is not None and input.strip() != "":
        return {"prompt": instruction.strip() + "\n\n" + input.strip() + "\n\n", "completion": output.strip()}
    return {"prompt": instruction.strip() + "\n\n", "completion": output.strip()}


def encode_few_shot_example(instruction, examplars, input, output):
    """instruction_encode_templates.py @ e44fcf588."""
    prompt = instruction.strip() + "\n\n"
    for ex in examplars:
        prompt += "Input:\n" + ex["input"].strip() + "\n"
        prompt += "Output:\n" + ex["output"].strip() + "\n\n"
    prompt += "Input:\n" + input.strip() + "\n"
    prompt += "Output:\n"
    return {"prompt": prompt, "completion": output.strip()}


def _msgs(enc):
    return [{"role": "user", "content": enc["prompt"]}, {"role": "assistant", "content": enc["completion"]}]


def convert_instruction_rows(rows, rnd, fields=("instruction", "input", "output")):
    """convert_{stanford_alpaca,code_alpaca,gpt4_alpaca,self_instruct}_data (fields instruction/input/output)
    and convert_dolly_data (instruction/context/response) @ e44fcf588."""
    i, x, o = fields
    return [_msgs(encode_instruction_example(r[i], r[x], r[o], rnd)) for r in rows]


def convert_unnatural(rows, rnd):
    """convert_unnatural_instructions_data @ e44fcf588."""
    out = []
    for task in rows:
        for inst in task["instances"]:
            if inst["constraints"] and inst["constraints"].lower() not in ["none", "none."]:
                instr = task["instruction"] + "\n" + inst["constraints"]
            else:
                instr = task["instruction"]
            out.append(_msgs(encode_instruction_example(instr, inst["input"], inst["output"], rnd)))
    return out


def convert_super_ni(tasks, rnd, zero=60, few=20, n_few_shot=2):
    """convert_super_ni_data @ e44fcf588, per task (already in train_tasks.txt order, mmmlu removed)."""
    out = []
    for task_data in tasks:
        instruction = task_data["Definition"][0]
        if zero + few < len(task_data["Instances"]):
            instances = rnd.sample(task_data["Instances"], k=zero + few)
        else:
            instances = task_data["Instances"]
        for instance in instances[:zero]:
            out.append(_msgs(encode_instruction_example(instruction, instance["input"], instance["output"][0], rnd)))
        for instance in instances[zero:]:
            if n_few_shot < len(task_data["Positive Examples"]):
                ex = rnd.sample(task_data["Positive Examples"], k=n_few_shot)
            else:
                ex = task_data["Positive Examples"]
            out.append(_msgs(encode_few_shot_example(instruction, ex, instance["input"], instance["output"][0])))
    return out


def _flan_prompt(example):
    prompt = example["inputs"]
    if not prompt.endswith("\n") and not prompt.rstrip().endswith(":"):
        prompt += "\n"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": example["targets"]}]


def convert_cot(zs_rows, fs_rows, rnd, n_zero=50000, n_few=50000):
    """convert_cot_data @ e44fcf588 (the zero-shot file is read when num_few_shot_examples > 0, sic)."""
    examples = []
    if n_few > 0:
        zs = list(zs_rows)
        if n_zero < len(zs):
            zs = rnd.sample(zs, k=n_zero)
        examples.extend(zs)
    if n_few > 0:
        fs = list(fs_rows)
        if n_few < len(fs):
            fs = rnd.sample(fs, k=n_few)
        examples.extend(fs)
    return [_flan_prompt(e) for e in examples]


def convert_flan_v2(rows):
    """convert_flan_v2_data @ e44fcf588."""
    return [_flan_prompt(e) for e in rows]


PORTIONS_V1 = {  # resample_flan_v2.py @ e44fcf588
    "flan_zsopt": 0.1, "flan_fsopt": 0.1, "flan_zsnoopt": 0.1, "flan_fsnoopt": 0.1,
    "t0_zsopt": 0.08, "t0_fsopt": 0.08, "t0_zsnoopt": 0.08, "t0_fsnoopt": 0.08,
    "niv2_zsopt": 0.1, "niv2_fsopt": 0.1, "cot_zsopt": 0.025, "cot_fsopt": 0.025,
    "dialog_zsopt": 0.015, "dialog_fsopt": 0.015,
}


def resample_flan_v2(files, total, rnd):
    """resample_flan_v2.py @ e44fcf588: ``files`` = {task_name: [lines]}."""
    num_samples = {k: int(v * total) for k, v in PORTIONS_V1.items()}
    out = []
    for task_name, num_sample in num_samples.items():
        lines = files[task_name]
        sampled = set(rnd.sample(range(len(lines)), num_sample))
        out.extend(line for i, line in enumerate(lines) if i in sampled)
    return out


def split_sharegpt(content, token_len, max_length):
    """split_sharegpt_conversations.py @ e44fcf588: split_all + filter_invalid_roles (no process pool).
    ``token_len(text)`` = len(tokenizer(text).input_ids) of the slow LLaMA tokenizer (BOS included)."""

    def make_sample(sample, start_idx, end_idx):
        assert (end_idx - start_idx) % 2 == 0
        return {"id": sample["id"] + "_" + str(start_idx), "conversations": sample["conversations"][start_idx:end_idx]}

    def split_one_sample(sample):
        tokenized_lens = []
        conversations = sample["conversations"]
        conversations = conversations[: len(conversations) // 2 * 2]
        for c in conversations:
            tokenized_lens.append(token_len(c["value"]) + 6)
        start_idx = 0
        cur_len = 0
        if len(conversations) % 2 != 0 or len(conversations) < 2:
            return []
        new_samples = []
        for i in range(0, len(conversations), 2):
            tmp_len = tokenized_lens[i] + tokenized_lens[i + 1]
            if cur_len + tmp_len > max_length:
                new_samples.append(make_sample(sample, start_idx, i))
                if tmp_len > max_length:
                    start_idx = i + 2
                else:
                    start_idx = i
                cur_len = 0
            elif i == len(conversations) - 2:
                new_samples.append(make_sample(sample, start_idx, i + 2))
            cur_len += tmp_len
        return new_samples

    new_content = []
    for sample in content:
        new_content.extend(split_one_sample(sample))
    kept = []
    for c in new_content:  # filter_invalid_roles
        roles = ["human", "gpt"]
        if len(c["conversations"]) <= 0:
            continue
        if all(s["from"] == roles[j % 2] for j, s in enumerate(c["conversations"])):
            kept.append(c)
    return kept


def convert_sharegpt(examples):
    """convert_sharegpt_data @ e44fcf588: (kept conversations, invalid count); raises on unknown senders."""
    out, invalid = [], 0
    for example in examples:
        messages, valid = [], True
        for m in example["conversations"]:
            if m["from"] in ("human", "user"):
                messages.append({"role": "user", "content": m["value"]})
            elif m["from"] in ("gpt", "chatgpt"):
                messages.append({"role": "assistant", "content": m["value"]})
            elif m["from"] in ("system", "bing"):
                valid = False
                invalid += 1
                break
            else:
                raise ValueError(f"Unknown message sender: {m['from']}")
        if messages and valid:
            out.append(messages)
    return out, invalid


def convert_baize(examples):
    """convert_baize_data @ e44fcf588."""
    out = []
    for example in examples:
        messages = []
        for rnd_ in example["input"].split("[|Human|]")[1:]:
            if not rnd_.strip() or "[|AI|]" not in rnd_:
                continue
            human, assistant = rnd_.split("[|AI|]")
            messages.append({"role": "user", "content": human.strip()})
            messages.append({"role": "assistant", "content": assistant.strip()})
        out.append(messages)
    return out


def convert_oasst1(trees, version="2306", top_k_reply=None):
    """convert_oasst1_data: "2306" @ e44fcf588 (every path to an assistant message), "2308a" @ 853377e82
    (leaf paths only), "2308b" @ 94055552c (+ creator-mention filter), "2310" @ 503407ee8 (leaf paths,
    deleted messages left out, top_k_reply by quality label; the creator filter is gone there). A
    reply without ``labels`` counts as unlabelled (503407ee8 itself would raise a KeyError)."""
    filter_strings = ["LAION", "Open Asssistant", "OpenAssistant"]

    def child_replies(reply):
        kids = reply["replies"]
        if version == "2310":
            kids = [c for c in kids if not c["deleted"]]
            for c in kids:
                c.setdefault("labels", {})
                if "quality" not in c["labels"]:
                    c["labels"]["quality"] = {"value": 0.0, "count": 0}
            if top_k_reply is not None:
                kids = sorted(kids, key=lambda x: x["labels"]["quality"]["value"], reverse=True)[:top_k_reply]
        return kids

    def dfs(reply, messages, valid_sequences):
        if version == "2308b" and any(s in reply["text"] for s in filter_strings):
            return
        if version == "2310" and reply["deleted"]:
            return
        if reply["role"] == "assistant":
            messages.append({"role": "assistant", "content": reply["text"]})
            if version == "2306":
                valid_sequences.append(messages[:])
                for child in reply["replies"]:
                    dfs(child, messages, valid_sequences)
            elif not reply["replies"]:
                valid_sequences.append(messages[:])
            else:
                for child in child_replies(reply):
                    dfs(child, messages, valid_sequences)
            messages.pop()
        elif reply["role"] == "prompter":
            messages.append({"role": "user", "content": reply["text"]})
            for child in child_replies(reply):
                dfs(child, messages, valid_sequences)
            messages.pop()
        else:
            raise ValueError(f"Unknown role: {reply['role']}")

    out = []
    for conversation in trees:
        seqs = []
        dfs(conversation["prompt"], [], seqs)
        out.extend(seqs)
    return out


# --------------------------------------------------------------------------------------------
# finetune.py @ e44fcf588 with its tokenizer: the slow LlamaTokenizer (transformers 4.28-4.30) after
# tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
# "pad_token": "<pad>"}): plain-string special tokens, so PreTrainedTokenizer.tokenize strips the
# whitespace on both sides of each ("We strip left and right by default") and SentencePiece-encodes
# each piece between them on its own (dummy prefix per piece); BOS prepended, no EOS appended.


class SlowLlamaTokenizer:
    SPECIALS = ("<s>", "</s>", "<unk>", "<pad>")

    def __init__(self, model_file):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.eos_token = "</s>"
        self.ids = {"<s>": 1, "</s>": 2, "<unk>": 0, "<pad>": 32000}

    def _split(self, text):
        """The trie split: longest special token at each position, left to right."""
        out, buf, i = [], "", 0
        while i < len(text):
            hit = max((s for s in self.SPECIALS if text.startswith(s, i)), key=len, default=None)
            if hit:
                out += [buf, hit]
                buf, i = "", i + len(hit)
            else:
                buf += text[i]
                i += 1
        out.append(buf)
        return out

    def tokenize_ids(self, text):
        tokens = self._split(text)
        for i, tok in enumerate(tokens):
            if tok in self.SPECIALS:
                if i + 1 < len(tokens) and tokens[i + 1]:
                    tokens[i + 1] = tokens[i + 1].lstrip()
                if i > 0 and tokens[i - 1]:
                    tokens[i - 1] = tokens[i - 1].rstrip()
        ids = []
        for tok in tokens:
            if not tok:
                continue
            ids += [self.ids[tok]] if tok in self.SPECIALS else self.sp.encode(tok)
        return ids

    def __call__(self, text, max_length=None):
        ids = [1] + self.tokenize_ids(text)
        return ids[:max_length] if max_length else ids


def encode_with_messages_format(messages, tokenizer, max_seq_length):
    """finetune.py @ e44fcf588: (input_ids, labels) as lists."""
    if len(messages) == 0:
        raise ValueError("messages field is empty.")

    def _concat_messages(messages):
        message_text = ""
        for message in messages:
            if message["role"] == "system":
                message_text += "<|system|>\n" + message["content"].strip() + "\n"
            elif message["role"] == "user":
                message_text += "<|user|>\n" + message["content"].strip() + "\n"
            elif message["role"] == "assistant":
                message_text += "<|assistant|>\n" + message["content"].strip() + tokenizer.eos_token + "\n"
            else:
                raise ValueError("Invalid role: {}".format(message["role"]))
        return message_text

    example_text = _concat_messages(messages).strip()
    input_ids = tokenizer(example_text, max_length=max_seq_length)
    labels = list(input_ids)
    for message_idx, message in enumerate(messages):
        if message["role"] != "assistant":
            if message_idx == 0:
                message_start_idx = 0
            else:
                message_start_idx = len(tokenizer(_concat_messages(messages[:message_idx]), max_length=max_seq_length))
            if message_idx < len(messages) - 1 and messages[message_idx + 1]["role"] == "assistant":
                messages_so_far = _concat_messages(messages[: message_idx + 1]) + "<|assistant|>\n"
            else:
                messages_so_far = _concat_messages(messages[: message_idx + 1])
            message_end_idx = len(tokenizer(messages_so_far, max_length=max_seq_length))
            labels[message_start_idx:message_end_idx] = [-100] * len(labels[message_start_idx:message_end_idx])
            if message_end_idx >= max_seq_length:
                break
    return input_ids, labels


def seeded(seed=42):
    """The reference's ``random.seed(seed)``, as an instance."""
    return random.Random(seed)
