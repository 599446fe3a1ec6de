"""Packed rows' attention on the CPU: SDPA under the full block mask against attention.prefix_sdpa's causal pass
plus correction, forward and forward+backward, at LLaVA-Med's row shape (4 rows x 620 tokens, 4 heads of 16).

    python benchmarks/packed_attention.py
"""
import torch, time
import torch.nn.functional as F
torch.manual_seed(0)
B,H,L,D=4,4,620,16
P,C,R=590,15,15
def mk(): 
    return [torch.randn(B,H,L,D,requires_grad=True) for _ in range(3)]
seg=torch.zeros(L,dtype=torch.long); seg[P:P+C]=1; seg[P+C:]=2
allowed=((seg[None,:]==seg[:,None])|(seg[None,:]==0)) & torch.ones(L,L,dtype=torch.bool).tril()
mask=torch.where(allowed,0.0,torch.finfo(torch.float32).min)[None,None].expand(B,1,L,L).contiguous()
def masked(q,k,v): return F.scaled_dot_product_attention(q,k,v,attn_mask=mask)
def causal(q,k,v): return F.scaled_dot_product_attention(q,k,v,is_causal=True)
def boolmask(q,k,v): return F.scaled_dot_product_attention(q,k,v,attn_mask=allowed[None,None])
def split(q,k,v):  # what attention.prefix_sdpa computes for one later response
    a=F.scaled_dot_product_attention(q[:,:,:P+C],k[:,:,:P+C],v[:,:,:P+C],is_causal=True)
    kk=torch.cat([k[:,:,:P],k[:,:,P+C:]],2); vv=torch.cat([v[:,:,:P],v[:,:,P+C:]],2)
    sub=allowed[P+C:][:, torch.cat([torch.arange(P),torch.arange(P+C,L)])]
    b=F.scaled_dot_product_attention(q[:,:,P+C:],kk,vv,attn_mask=sub[None,None])
    return torch.cat([a,b],2)
qkv=mk()
ref=masked(*qkv)
print("split err", (split(*qkv)-ref).abs().max().item(), (boolmask(*qkv)-ref).abs().max().item())
for name,fn in [("masked",masked),("bool",boolmask),("causal",causal),("split",split)]:
    ts=[]
    for i in range(12):
        q,k,v=mk()
        t=time.perf_counter(); o=fn(q,k,v); o.sum().backward(); ts.append(time.perf_counter()-t)
    ts=sorted(ts[2:]); 
    tf=[]
    for i in range(10):
        t=time.perf_counter(); 
        with torch.no_grad(): fn(q,k,v)
        tf.append(time.perf_counter()-t)
    print(name, "fwd+bwd ms %.2f"%(1000*ts[len(ts)//2]), "fwd ms %.2f"%(1000*sorted(tf)[5]))
